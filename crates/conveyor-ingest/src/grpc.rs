//! The gRPC `IngestService`, shared by the gateway and ingest.

use std::pin::Pin;
use std::sync::Arc;

use conveyor_api::grpc_health::health_service;
use conveyor_api::recorded::{self, Door};
use conveyor_api::trace::DoorTrace;
use conveyor_api::{Readiness, grpc_status};
use conveyor_core::{ApiError, ErrorCode, TRACEPARENT, TRACESTATE};
use conveyor_proto::v1::ingest_service_server::{IngestService, IngestServiceServer};
use conveyor_proto::v1::{
    EventResult, FILE_DESCRIPTOR_SET, IngestBatchRequest, IngestBatchResponse, IngestRequest,
    IngestResponse, IngestStreamResponse, PublishAck, PublishRequest,
};
use conveyor_proto::{draft_from_request, error_detail};
use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use crate::Intake;

/// How many streamed events are submitted to the queue together. Bounds the memory a stream
/// holds and lets one queue round trip confirm many events.
const STREAM_CHUNK: usize = 256;

pub struct IngestGrpc {
    intake: Arc<dyn Intake>,
    readiness: Readiness,
    max_batch_events: usize,
}

impl IngestGrpc {
    pub fn new(intake: Arc<dyn Intake>, readiness: Readiness, max_batch_events: usize) -> Self {
        IngestGrpc {
            intake,
            readiness,
            max_batch_events,
        }
    }

    /// The tonic service, with message size bounded by `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> IngestServiceServer<IngestGrpc> {
        IngestServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes.max(4 * 1024 * 1024))
    }

    /// The service as axum routes, to merge with a service's HTTP routes on one port, together
    /// with the gRPC ecosystem's standard services: health checking (`grpc.health.v1.Health`,
    /// following the same readiness as `/ready`; [`health_service`]) and server reflection (v1
    /// and v1alpha, describing all three), so that probes, grpcurl and Postman need nothing from
    /// this repository. Spawns the health reporting task: call it on the Tokio runtime.
    pub fn into_router(self, max_message_bytes: usize) -> axum::Router {
        let health = health_service(
            self.readiness.clone(),
            Some(crate::ready_probe(Arc::clone(&self.intake))),
            &[IngestServiceServer::<IngestGrpc>::NAME],
        );
        let mut routes =
            tonic::service::Routes::new(self.into_server(max_message_bytes)).add_service(health);
        match (reflection().build_v1(), reflection().build_v1alpha()) {
            (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "gRPC server reflection is off: the compiled-in descriptors do not decode");
            }
        }
        routes.into_axum_router()
    }

    async fn submit(
        &self,
        door: Door,
        requests: Vec<IngestRequest>,
    ) -> Vec<Result<String, ApiError>> {
        recorded::received(door, requests.len());
        if let Err(error) = self.readiness.check() {
            self.intake.count_refused(error.code, requests.len());
            return vec![Err(error); requests.len()];
        }
        let drafts = requests.into_iter().map(draft_from_request).collect();
        self.intake.submit(drafts).await
    }

    /// [`submit`](Self::submit) for a call (or a stream's chunk) whose metadata names a
    /// `traceparent`: a door span for the call (or chunk), and its context on every event that
    /// does not carry one of its own. Without the metadata nothing changes (split mode's
    /// gateway → ingest calls carry the context per event, in `IngestRequest.headers`).
    async fn submit_traced(
        &self,
        door: Door,
        name: &'static str,
        call: &CallTrace,
        mut requests: Vec<IngestRequest>,
    ) -> Vec<Result<String, ApiError>> {
        let Some(traceparent) = call.traceparent.as_deref() else {
            return self.submit(door, requests).await;
        };
        let trace = DoorTrace::begin(Some(traceparent), call.tracestate.as_deref());
        if trace.header.is_some() {
            for request in &mut requests {
                trace.apply(&mut request.headers, false);
            }
        }
        let count = requests.len();
        let results = self.submit(door, requests).await;
        let refused = results.iter().filter(|result| result.is_err()).count();
        trace.finish(
            name,
            count,
            (refused > 0).then(|| format!("{refused} of {count} events refused")),
        );
        results
    }
}

/// Server reflection over conveyor's own schema and the health service's.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The call's `traceparent` and `tracestate` metadata, if any.
#[derive(Debug, Clone, Default)]
struct CallTrace {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl CallTrace {
    fn of<T>(request: &Request<T>) -> CallTrace {
        let get = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        CallTrace {
            traceparent: get(TRACEPARENT),
            tracestate: get(TRACESTATE),
        }
    }
}

fn event_result(index: usize, result: Result<String, ApiError>) -> EventResult {
    match result {
        Ok(message_id) => EventResult {
            index: index as u32,
            message_id,
            error: None,
        },
        Err(error) => EventResult {
            index: index as u32,
            message_id: String::new(),
            error: Some(error_detail(&error)),
        },
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<PublishAck, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl IngestService for IngestGrpc {
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        let call = CallTrace::of(&request);
        let result = self
            .submit_traced(Door::GrpcUnary, "ingest", &call, vec![request.into_inner()])
            .await
            .pop()
            .unwrap_or_else(|| Err(ApiError::internal("intake returned no result")));
        match result {
            Ok(message_id) => Ok(Response::new(IngestResponse {
                message_id,
                status: "accepted".into(),
            })),
            Err(error) => Err(grpc_status(&error)),
        }
    }

    async fn ingest_stream(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<IngestStreamResponse>, Status> {
        let call = CallTrace::of(&request);
        let mut stream = request.into_inner().ready_chunks(STREAM_CHUNK);
        let mut summary = IngestStreamResponse::default();
        let mut index = 0usize;
        while let Some(chunk) = stream.next().await {
            let mut requests = Vec::with_capacity(chunk.len());
            let mut broken = None;
            for item in chunk {
                match item {
                    Ok(request) => requests.push(request),
                    Err(status) => {
                        broken = Some(status);
                        break;
                    }
                }
            }
            let results = self
                .submit_traced(Door::GrpcStream, "ingest_stream", &call, requests)
                .await;
            for result in results {
                match result {
                    Ok(_) => summary.accepted += 1,
                    Err(error) => {
                        summary.rejected += 1;
                        summary.rejections.push(event_result(index, Err(error)));
                    }
                }
                index += 1;
            }
            // A client stream that breaks mid-way: what was submitted stands; report the break.
            if let Some(status) = broken {
                return Err(Status::new(
                    status.code(),
                    format!(
                        "the stream broke after {index} events ({} accepted): {}",
                        summary.accepted,
                        status.message()
                    ),
                ));
            }
        }
        Ok(Response::new(summary))
    }

    async fn ingest_batch(
        &self,
        request: Request<IngestBatchRequest>,
    ) -> Result<Response<IngestBatchResponse>, Status> {
        let call = CallTrace::of(&request);
        let events = request.into_inner().events;
        if events.len() > self.max_batch_events {
            self.intake
                .count_refused(ErrorCode::BatchTooLarge, events.len());
            return Err(grpc_status(&ApiError::new(
                ErrorCode::BatchTooLarge,
                format!("the batch holds more than {} events", self.max_batch_events),
            )));
        }
        let results = self
            .submit_traced(Door::GrpcBatch, "ingest_batch", &call, events)
            .await
            .into_iter()
            .enumerate()
            .map(|(index, result)| event_result(index, result))
            .collect();
        Ok(Response::new(IngestBatchResponse { results }))
    }

    type PublishStream = AckStream;

    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let call = CallTrace::of(&request);
        let mut inbound = request.into_inner().ready_chunks(STREAM_CHUNK);
        // The answer channel is bounded: a client that does not read its acks stops being read.
        let (acks, answers) = tokio::sync::mpsc::channel(STREAM_CHUNK * 2);
        let service = IngestGrpc {
            intake: Arc::clone(&self.intake),
            readiness: self.readiness.clone(),
            max_batch_events: self.max_batch_events,
        };
        tokio::spawn(async move {
            while let Some(chunk) = inbound.next().await {
                let mut sequences = Vec::with_capacity(chunk.len());
                let mut requests = Vec::with_capacity(chunk.len());
                let mut broken = None;
                for item in chunk {
                    match item {
                        Ok(PublishRequest {
                            sequence,
                            event: Some(event),
                        }) => {
                            sequences.push(sequence);
                            requests.push(event);
                        }
                        Ok(PublishRequest {
                            sequence,
                            event: None,
                        }) => {
                            let missing = ApiError::field("event", "the request carries no event");
                            service.intake.count_refused(missing.code, 1);
                            let ack = PublishAck {
                                sequence,
                                message_id: String::new(),
                                error: Some(error_detail(&missing)),
                            };
                            if acks.send(Ok(ack)).await.is_err() {
                                return;
                            }
                        }
                        Err(status) => {
                            broken = Some(status);
                            break;
                        }
                    }
                }
                for (sequence, result) in sequences.into_iter().zip(
                    service
                        .submit_traced(Door::GrpcPublish, "publish_stream", &call, requests)
                        .await,
                ) {
                    let ack = match result {
                        Ok(message_id) => PublishAck {
                            sequence,
                            message_id,
                            error: None,
                        },
                        Err(error) => PublishAck {
                            sequence,
                            message_id: String::new(),
                            error: Some(error_detail(&error)),
                        },
                    };
                    if acks.send(Ok(ack)).await.is_err() {
                        // The client went away; events already submitted stand.
                        return;
                    }
                }
                if let Some(status) = broken {
                    let _ = acks.send(Err(status)).await;
                    return;
                }
            }
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(answers)) as AckStream
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `into_router` serves without reflection (and logs why) if the compiled-in descriptors
    /// do not decode: they must.
    #[test]
    fn the_compiled_in_descriptors_make_both_reflection_services() {
        assert!(reflection().build_v1().is_ok(), "v1");
        assert!(reflection().build_v1alpha().is_ok(), "v1alpha");
    }
}
