//! The ingest's own families: how long a publish took, how big publish batches and payloads
//! are. Recorded into relaxed atomics ([`Histogram`]) as the ingest works; [`register`]ed with
//! `/metrics` when an [`Ingest`](crate::Ingest) is made, so only a process that runs an ingest
//! shows them.

use conveyor_api::exposition::{self, Exposition};
use conveyor_api::histogram::{BATCH_EVENTS, Histogram, PAYLOAD_BYTES};

/// Time from handing a batch to the queue until it confirmed (or refused) every event.
pub static PUBLISH_DURATION: Histogram = Histogram::seconds();
/// Events per publish call.
pub static PUBLISH_BATCH_EVENTS: Histogram = Histogram::new(BATCH_EVENTS, 1.0);
/// Payload size of each valid event taken in.
pub static PAYLOAD_SIZE: Histogram = Histogram::new(PAYLOAD_BYTES, 1.0);

/// This process runs an ingest: its families join `/metrics`.
pub fn register() {
    exposition::register("ingest", render);
}

fn render(out: &mut Exposition) {
    for (name, help, histogram) in [
        (
            "conveyor_publish_duration_seconds",
            "Time from handing a batch to the queue until it confirmed every event in it.",
            &PUBLISH_DURATION,
        ),
        (
            "conveyor_publish_batch_events",
            "Events per publish call to the queue.",
            &PUBLISH_BATCH_EVENTS,
        ),
        (
            "conveyor_event_payload_bytes",
            "Payload size of each valid event taken in.",
            &PAYLOAD_SIZE,
        ),
    ] {
        out.histograms(name, help, vec![(Vec::new(), histogram.value())]);
    }
}

#[cfg(test)]
mod tests {
    use conveyor_api::exposition::Format;

    use super::*;

    /// The families as the hand-written renderer wrote them before prometheus-client.
    #[test]
    fn the_ingest_families_keep_their_names_and_types() {
        let mut out = Exposition::new();
        render(&mut out);
        let text = out.encode(Format::Prometheus);
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "conveyor_publish_duration_seconds histogram",
                "conveyor_publish_batch_events histogram",
                "conveyor_event_payload_bytes histogram",
            ]
        );
        assert!(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .all(|l| !l.contains('{') || l.contains("{le=")),
            "no labels but le:\n{text}"
        );
    }
}
