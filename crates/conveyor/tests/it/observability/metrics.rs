//! Every service's `/metrics` holds the documented families, they move when events flow, and
//! `promtool check metrics` accepts the output.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::harness::{Conveyor, eventually, spawn_run, spawn_split};

use super::scrape::{Scrape, promtool_check_metrics, scrape};
use super::traffic::{STAGES, send_traffic};

/// Families on every service's `/metrics`.
const COMMON: &[&str] = &[
    "http_requests_total",
    "http_request_duration_seconds",
    "http_requests_in_flight",
    "system_health_status",
    "conveyor_build_info",
    "conveyor_ready",
    "conveyor_events_received_total",
    "conveyor_error_answers_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_threads",
    "process_start_time_seconds",
    "process_open_fds",
];

/// Families of a process that validates and publishes (ingest, run).
const INGEST: &[&str] = &[
    "conveyor_events_accepted_total",
    "conveyor_events_rejected_total",
    "conveyor_publish_duration_seconds",
    "conveyor_publish_batch_events",
    "conveyor_event_payload_bytes",
];

/// Families of the queue and pool, from stats (processor, run, and the gateway's system view).
const POOL: &[&str] = &[
    "queue_size",
    "worker_pool_active",
    "messages_processed_total",
    "conveyor_queue_info",
    "conveyor_queue_capacity",
    "conveyor_queue_in_flight",
    "conveyor_queue_consumer_lag",
    "conveyor_queue_published_total",
    "conveyor_queue_acked_total",
    "conveyor_queue_nacked_total",
    "conveyor_queue_terminated_total",
    "conveyor_queue_redelivered_total",
    "conveyor_queue_duplicates_total",
    "conveyor_worker_pool_size",
    "conveyor_processing_errors_total",
    "conveyor_retries_total",
    "conveyor_dead_lettered_total",
    "conveyor_duplicates_skipped_total",
    "conveyor_dlq_size",
];

/// Families recorded by a process that runs the worker pool (processor, run).
const PROCESSOR_RECORDED: &[&str] = &[
    "conveyor_fetch_batch_events",
    "conveyor_stage_duration_seconds",
    "conveyor_stage_events_total",
    "conveyor_pipeline_events_total",
    "conveyor_sink_events_total",
    "conveyor_sink_healthy",
    "conveyor_sink_in_flight_writes",
    "conveyor_sink_write_duration_seconds",
    "conveyor_sink_batch_events",
    "conveyor_end_to_end_latency_seconds",
    "conveyor_sink_errors_total",
    "conveyor_worker_busy_seconds_total",
];

/// Waits until the front's status shows `n` events done (processed or dead-lettered) and the
/// DLQ holds the poison event.
async fn wait_done(front: &Conveyor, n: u64) {
    front.wait_until_processed(n, Duration::from_secs(30)).await;
    eventually(
        "the poison event in the DLQ",
        Duration::from_secs(20),
        async || {
            let status = front.status().await;
            if status["totals"]["dead_lettered"] == 1 {
                Ok(())
            } else {
                Err(format!("{}", status["totals"]))
            }
        },
    )
    .await;
}

fn assert_at_least_20(service: &str, scrape: &Scrape) {
    assert!(
        scrape.types.len() >= 20,
        "{service} exposes {} metric families, want at least 20: {:?}",
        scrape.types.len(),
        scrape.types.keys().collect::<Vec<_>>()
    );
}

/// The figures that must have moved in a process that did everything (run) or the processor.
fn assert_processor_moved(service: &str, before: &Scrape, after: &Scrape) {
    let moved = |name: &str| after.sum(name) - before.sum(name);
    assert_eq!(
        moved("messages_processed_total"),
        150.0,
        "{service}: messages_processed_total"
    );
    assert_eq!(
        after.get("conveyor_dlq_size"),
        1.0,
        "{service}: conveyor_dlq_size"
    );
    assert_eq!(moved("conveyor_dead_lettered_total"), 1.0, "{service}");
    assert!(moved("conveyor_retries_total") >= 1.0, "{service}: retries");
    assert!(
        moved("conveyor_processing_errors_total") >= 2.0,
        "{service}: two failed attempts of the poison event"
    );
    assert!(
        moved("conveyor_queue_acked_total") >= 150.0,
        "{service}: acked"
    );
    assert!(
        moved("conveyor_queue_redelivered_total") >= 1.0,
        "{service}: the poison event was delivered twice"
    );
    assert_eq!(after.get("conveyor_worker_pool_size"), 2.0, "{service}");
    // Histograms recorded on the hot path.
    for count in [
        "conveyor_fetch_batch_events_count",
        "conveyor_sink_write_duration_seconds_count",
        "conveyor_sink_batch_events_count",
    ] {
        assert!(moved(count) >= 1.0, "{service}: {count} did not move");
    }
    assert_eq!(
        moved("conveyor_end_to_end_latency_seconds_count"),
        150.0,
        "{service}: one end-to-end latency per written event"
    );
    assert!(
        after.get("conveyor_end_to_end_latency_seconds_bucket{le=\"+Inf\"}") >= 150.0,
        "{service}"
    );
    // Every delivery (151 events, the poison one twice) went through the json stage, the
    // first of the `--stage` pipeline (called `default`).
    let json_stage = "{pipeline=\"default\",stage=\"1-json\"}";
    assert!(
        after.get(&format!(
            "conveyor_stage_duration_seconds_count{json_stage}"
        )) - before.get(&format!(
            "conveyor_stage_duration_seconds_count{json_stage}"
        )) >= 152.0,
        "{service}: json stage timings"
    );
    assert!(
        moved("conveyor_stage_events_total") >= 152.0 * 2.0 - 2.0,
        "{service}: every delivery through both stages"
    );
    assert_eq!(
        moved("conveyor_sink_events_total"),
        150.0,
        "{service}: every written event counted at its sink"
    );
    assert!(
        moved("conveyor_pipeline_events_total") >= 152.0 * 2.0,
        "{service}: every delivery in and routed (or failed)"
    );
    assert!(
        moved("conveyor_worker_busy_seconds_total") > 0.0,
        "{service}: worker busy time"
    );
}

fn assert_ingest_moved(service: &str, before: &Scrape, after: &Scrape) {
    let moved = |name: &str| after.sum(name) - before.sum(name);
    assert_eq!(
        moved("conveyor_events_accepted_total"),
        151.0,
        "{service}: accepted"
    );
    assert!(
        moved("conveyor_publish_duration_seconds_count") >= 1.0,
        "{service}: publish latency recorded"
    );
    assert!(
        moved("conveyor_publish_batch_events_sum") >= 151.0,
        "{service}: every accepted event was in a published batch"
    );
    assert_eq!(
        moved("conveyor_event_payload_bytes_count"),
        151.0,
        "{service}: one payload size per valid event"
    );
}

fn assert_front_moved(service: &str, before: &Scrape, after: &Scrape) {
    let moved = |series: &str| after.get(series) - before.get(series);
    assert_eq!(
        moved("conveyor_events_received_total{door=\"http_single\"}"),
        52.0,
        "{service}: 50 events, the poison one and the malformed body came in one by one"
    );
    assert_eq!(
        moved("conveyor_events_received_total{door=\"http_batch\"}"),
        100.0,
        "{service}"
    );
    assert_eq!(
        moved("conveyor_error_answers_total{code=\"invalid_json\"}"),
        1.0,
        "{service}: the malformed body"
    );
    assert!(
        after.sum("http_requests_total") - before.sum("http_requests_total") >= 52.0,
        "{service}: http_requests_total"
    );
    assert!(
        after.get("http_requests_total{route=\"/api/v1/ingest\",method=\"POST\",status=\"400\"}")
            >= 1.0,
        "{service}: the 400 is counted under its route pattern"
    );
    assert!(
        after.sum("http_request_duration_seconds_count")
            > before.sum("http_request_duration_seconds_count"),
        "{service}"
    );
    assert_eq!(after.get("system_health_status"), 1.0, "{service}");
    assert_eq!(after.get("conveyor_ready"), 1.0, "{service}");
    assert!(
        after.get("process_resident_memory_bytes") > 1e6,
        "{service}: RSS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_mode_metrics_cover_every_family_move_with_traffic_and_pass_promtool() {
    let mut args = STAGES.to_vec();
    args.extend(["--workers", "2"]);
    let conveyor = spawn_run(&args).await;
    let before = scrape(&conveyor).await;
    let all: Vec<&str> = [COMMON, INGEST, POOL, PROCESSOR_RECORDED].concat();
    before.assert_families("run", &all);

    let accepted = send_traffic(&conveyor, "run").await;
    wait_done(&conveyor, accepted).await;
    let after = scrape(&conveyor).await;

    assert_at_least_20("run", &after);
    assert_front_moved("run", &before, &after);
    assert_ingest_moved("run", &before, &after);
    assert_processor_moved("run", &before, &after);
    assert_eq!(
        after.get("conveyor_queue_info{backend=\"memory\",durable=\"false\"}"),
        1.0
    );
    assert_eq!(after.get("queue_size"), 0.0, "queue drained");
    assert_eq!(
        after.get("conveyor_queue_consumer_lag"),
        0.0,
        "nothing left"
    );
    promtool_check_metrics("run", &after.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_every_service_exposes_its_metrics_and_passes_promtool() {
    let mut processor_args = STAGES.to_vec();
    processor_args.extend(["--workers", "2"]);
    let split = spawn_split(&processor_args).await;
    let services = [
        ("gateway", &split.gateway),
        ("ingest", &split.ingest),
        ("processor", &split.processor),
    ];
    let mut before = BTreeMap::new();
    for (name, service) in services {
        before.insert(name, scrape(service).await);
    }

    let accepted = send_traffic(&split.gateway, "split").await;
    wait_done(&split.gateway, accepted).await;

    let mut after = BTreeMap::new();
    for (name, service) in services {
        let scrape = scrape(service).await;
        assert_at_least_20(name, &scrape);
        scrape.assert_families(name, COMMON);
        promtool_check_metrics(name, &scrape.text);
        after.insert(name, scrape);
    }

    // The gateway: client doors, error answers, the system-wide view, each instance's health.
    let (gw_before, gw) = (&before["gateway"], &after["gateway"]);
    gw.assert_families("gateway", &[INGEST[..2].to_vec(), POOL.to_vec()].concat());
    assert_front_moved("gateway", gw_before, gw);
    assert_eq!(
        gw.sum("messages_processed_total") - gw_before.sum("messages_processed_total"),
        150.0,
        "gateway: the system-wide processed count"
    );
    for role in ["ingest", "processor"] {
        let url = match role {
            "ingest" => split.ingest.base_url(),
            _ => split.processor.base_url(),
        };
        let healthy: Vec<(&String, &f64)> = gw
            .samples
            .iter()
            .filter(|(s, _)| {
                s.starts_with("conveyor_instance_healthy{")
                    && s.contains(&format!("role=\"{role}\""))
                    && s.contains(url)
            })
            .collect();
        assert_eq!(
            healthy.iter().map(|(_, v)| **v).collect::<Vec<_>>(),
            vec![1.0],
            "gateway: conveyor_instance_healthy for the {role} at {url}"
        );
    }
    // The gateway does not run the pool: no empty sink histograms pretending otherwise.
    assert!(
        !gw.types
            .contains_key("conveyor_sink_write_duration_seconds"),
        "gateway shows processor-only histograms"
    );

    // Ingest: what arrived over gRPC from the gateway, what it published, and how long that took.
    let (in_before, ingest) = (&before["ingest"], &after["ingest"]);
    ingest.assert_families("ingest", INGEST);
    assert_ingest_moved("ingest", in_before, ingest);
    assert!(
        ingest.sum("conveyor_events_received_total")
            - in_before.sum("conveyor_events_received_total")
            >= 151.0,
        "ingest: events received from the gateway"
    );

    // Processor: the queue, the pool and the hot-path histograms.
    let (pr_before, processor) = (&before["processor"], &after["processor"]);
    processor.assert_families("processor", &[POOL, PROCESSOR_RECORDED].concat());
    assert_processor_moved("processor", pr_before, processor);
    assert!(
        processor.get("conveyor_events_received_total{door=\"enqueue\"}") >= 151.0,
        "processor: events handed over by ingest"
    );

    let names: BTreeSet<&String> = after.values().flat_map(|s| s.types.keys()).collect();
    assert!(names.len() >= 40, "{} families in all", names.len());
}
