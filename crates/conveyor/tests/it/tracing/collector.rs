//! A small OTLP/HTTP collector for the tests: `POST /v1/traces` with protobuf, decoded with
//! the upstream OTLP definitions (`opentelemetry-proto`), every span kept. Optionally behind
//! TLS (a certificate the openssl CLI makes for the test) and answering 503 to the first
//! requests. [`Collector::start_grpc`] is the same over OTLP/gRPC (the crate's tonic server).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

use crate::harness::eventually;

/// One span as the collector received it.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    /// The resource's `service.instance.id`.
    pub instance: Option<String>,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent: Option<String>,
    pub event_id: Option<String>,
    pub trace_state: String,
}

#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Answer 503 to this many requests first.
    pub fail_first: usize,
    /// Serve https with a generated certificate.
    pub tls: bool,
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Collector {
    pub url: String,
    spans: Shared<Vec<Span>>,
    problems: Shared<Vec<String>>,
    /// The headers of every request, in order.
    requests: Shared<Vec<HeaderMap>>,
    /// The CA certificate (PEM file) that signed the https certificate.
    pub ca: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

impl Collector {
    pub async fn start() -> Collector {
        Collector::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Collector {
        let spans: Shared<Vec<Span>> = Arc::default();
        let problems: Shared<Vec<String>> = Arc::default();
        let requests: Shared<Vec<HeaderMap>> = Arc::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let (kept, bad, heard) = (spans.clone(), problems.clone(), requests.clone());
        let fail_first = options.fail_first;
        let app = Router::new().route(
            "/v1/traces",
            post(move |headers: HeaderMap, body: Bytes| {
                let (kept, bad, heard, seen) =
                    (kept.clone(), bad.clone(), heard.clone(), seen.clone());
                async move {
                    lock(&heard).push(headers.clone());
                    if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                        return (StatusCode::SERVICE_UNAVAILABLE, Vec::new());
                    }
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if content_type != "application/x-protobuf" {
                        lock(&bad).push(format!("content-type {content_type:?}"));
                    }
                    match ExportTraceServiceRequest::decode(body.as_ref()) {
                        Ok(request) => lock(&kept).extend(read_spans(&request)),
                        Err(error) => lock(&bad).push(format!("{error}: {} bytes", body.len())),
                    }
                    // An empty ExportTraceServiceResponse.
                    (StatusCode::OK, Vec::new())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let plain = listener.local_addr().expect("the collector's address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (url, ca, dir) = if options.tls {
            let dir = tempfile::tempdir().expect("a directory for the certificates");
            let ca = certificates(dir.path());
            let port = tls_front(dir.path(), plain).await;
            (format!("https://127.0.0.1:{port}"), Some(ca), Some(dir))
        } else {
            (format!("http://{plain}"), None, None)
        };
        Collector {
            url,
            spans,
            problems,
            requests,
            ca,
            _dir: dir,
        }
    }

    /// An OTLP/gRPC collector: `opentelemetry.proto.collector.trace.v1.TraceService/Export`,
    /// taking gzip; with `tls`, over TLS with a generated certificate.
    pub async fn start_grpc(tls: bool) -> Collector {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        use tonic::transport::{Identity, Server, ServerTlsConfig};
        let spans: Shared<Vec<Span>> = Arc::default();
        let requests: Shared<Vec<HeaderMap>> = Arc::default();
        let service = GrpcCollector {
            spans: spans.clone(),
            requests: requests.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC collector");
        let address = listener.local_addr().expect("the collector's address");
        let mut server = Server::builder();
        let (url, ca, dir) = if tls {
            let dir = tempfile::tempdir().expect("a directory for the certificates");
            let ca = certificates(dir.path());
            let read =
                |name: &str| std::fs::read(dir.path().join(name)).expect("a certificate file");
            let identity = Identity::from_pem(read("server.pem"), read("server.key"));
            server = server
                .tls_config(ServerTlsConfig::new().identity(identity))
                .expect("the server's TLS");
            (format!("https://{address}"), Some(ca), Some(dir))
        } else {
            (format!("http://{address}"), None, None)
        };
        tokio::spawn(
            server
                .add_service(
                    TraceServiceServer::new(service)
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Collector {
            url,
            spans,
            problems: Arc::default(),
            requests,
            ca,
            _dir: dir,
        }
    }

    pub fn all(&self) -> Vec<Span> {
        let problems = lock(&self.problems).clone();
        assert!(problems.is_empty(), "bad export requests: {problems:?}");
        lock(&self.spans).clone()
    }

    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.all()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// The headers of every export request so far.
    pub fn requests(&self) -> Vec<HeaderMap> {
        lock(&self.requests).clone()
    }

    /// The trace of the event whose `process` span names `event_id`.
    pub async fn trace_of_event(&self, event_id: &str) -> String {
        eventually(
            &format!("a process span for event {event_id}"),
            Duration::from_secs(20),
            async || {
                let spans = lock(&self.spans);
                spans
                    .iter()
                    .find(|s| s.name == "process" && s.event_id.as_deref() == Some(event_id))
                    .map(|s| s.trace_id.clone())
                    .ok_or_else(|| format!("{} spans so far", spans.len()))
            },
        )
        .await
    }
}

struct GrpcCollector {
    spans: Shared<Vec<Span>>,
    requests: Shared<Vec<HeaderMap>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcCollector
{
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        lock(&self.requests).push(request.metadata().clone().into_headers());
        lock(&self.spans).extend(read_spans(request.get_ref()));
        Ok(tonic::Response::new(Default::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(AnyValue::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

fn read_spans(request: &ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for resource in &request.resource_spans {
        let attributes = resource
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        let service = string_attribute(attributes, "service.name").unwrap_or_default();
        let instance = string_attribute(attributes, "service.instance.id");
        for scope in &resource.scope_spans {
            for span in &scope.spans {
                out.push(Span {
                    service: service.clone(),
                    instance: instance.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: (!span.parent_span_id.is_empty()).then(|| hex(&span.parent_span_id)),
                    event_id: string_attribute(&span.attributes, "conveyor.event_id"),
                    trace_state: span.trace_state.clone(),
                });
            }
        }
    }
    out
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl CLI (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A test CA and a server certificate for 127.0.0.1 signed by it; returns the CA's PEM file.
fn certificates(dir: &Path) -> PathBuf {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=conveyor test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write the extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    dir.join("ca.pem")
}

/// A TLS listener in front of the plain collector: terminates TLS with the server
/// certificate and relays the bytes. Returns its port.
async fn tls_front(dir: &Path, plain: std::net::SocketAddr) -> u16 {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .expect("read server.pem")
        .collect::<Result<_, _>>()
        .expect("parse server.pem");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("read server.key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("the server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the TLS front");
    let port = listener
        .local_addr()
        .expect("the TLS front's address")
        .port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(plain).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}
