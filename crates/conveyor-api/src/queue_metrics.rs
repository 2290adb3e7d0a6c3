//! Labelled metric families for what only some queues have: Kafka's partitions and a composite
//! queue's backends (the unlabelled queue families are `QUEUE_FAMILIES` in [`crate::metrics`]).
//! Rendered from the same [`QueueStats`] snapshot `/stats` reports; a queue without partitions
//! or backends renders nothing here. Labels are bounded: partition ids of one topic,
//! backend names from `COMPOSITE_PROVIDERS`.

use conveyor_core::stats::{BackendStats, PartitionStats, QueueStats};

use crate::exposition::{Exposition, Labels};

/// One metric family with a sample per item (a partition, a backend): name, type, help, and
/// each item's value; the labels come from the caller.
struct LabelledFamily<T> {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&T) -> i64,
}

fn render_families<T>(
    out: &mut Exposition,
    families: &[LabelledFamily<T>],
    items: &[T],
    labels: impl Fn(&T) -> Labels,
) {
    for family in families {
        let series = items
            .iter()
            .map(|item| (labels(item), (family.value)(item)));
        if family.kind == "counter" {
            let series = series
                .map(|(l, v)| (l, u64::try_from(v).unwrap_or(0)))
                .collect();
            out.counters(family.name, family.help, series);
        } else {
            out.gauges(family.name, family.help, series.collect());
        }
    }
}

/// Appends the partition and backend families of `stats` (nothing for other queues).
pub fn render_queue_detail(out: &mut Exposition, stats: &QueueStats) {
    if !stats.partitions.is_empty() {
        let families: [LabelledFamily<PartitionStats>; 3] = [
            LabelledFamily {
                name: "conveyor_kafka_consumer_lag",
                kind: "gauge",
                help: "Events in the partition the consumer group has not committed yet.",
                value: |p| p.lag as i64,
            },
            LabelledFamily {
                name: "conveyor_kafka_partition_in_flight",
                kind: "gauge",
                help: "Events of the partition this process holds (delivered, buffered, waiting to retry).",
                value: |p| p.in_flight as i64,
            },
            LabelledFamily {
                name: "conveyor_kafka_high_watermark",
                kind: "gauge",
                help: "The next offset the broker assigns in the partition.",
                value: |p| p.high_watermark,
            },
        ];
        render_families(out, &families, &stats.partitions, |p| {
            vec![("partition", p.partition.to_string())]
        });
    }
    if let Some(group) = &stats.group {
        // The Kafka member's view of itself: one sample each, no labels.
        let samples = [
            (
                "conveyor_kafka_group_stalls_total",
                "counter",
                "Times this member found partitions with lag that no group member consumed for twice the session timeout, and rejoined the group.",
                group.stalls as i64,
            ),
            (
                "conveyor_kafka_group_stalled",
                "gauge",
                "1 while this member finds the group stalled, else 0.",
                i64::from(group.stalled),
            ),
            (
                "conveyor_kafka_assigned_partitions",
                "gauge",
                "Partitions of the events topic assigned to this member.",
                group.assigned.len() as i64,
            ),
        ];
        for (name, kind, help, value) in samples {
            if kind == "counter" {
                out.counter(name, help, u64::try_from(value).unwrap_or(0));
            } else {
                out.gauge(name, help, value);
            }
        }
    }
    if !stats.backends.is_empty() {
        let families: [LabelledFamily<BackendStats>; 4] = [
            LabelledFamily {
                name: "conveyor_composite_publishes_total",
                kind: "counter",
                help: "Events a composite backend confirmed.",
                value: |b| b.published as i64,
            },
            LabelledFamily {
                name: "conveyor_composite_failures_total",
                kind: "counter",
                help: "Events a composite backend refused or failed to confirm.",
                value: |b| b.failed as i64,
            },
            LabelledFamily {
                name: "conveyor_composite_divergence",
                kind: "gauge",
                help: "Events the primary holds that this backend lacks (for the primary: the reverse).",
                value: |b| b.divergence as i64,
            },
            LabelledFamily {
                name: "conveyor_composite_backend_healthy",
                kind: "gauge",
                help: "1 when the composite backend is reachable, else 0.",
                value: |b| i64::from(b.healthy),
            },
        ];
        render_families(out, &families, &stats.backends, |b| {
            let role = if b.primary { "primary" } else { "secondary" };
            vec![("backend", b.name.clone()), ("role", role.to_owned())]
        });
    }
}

#[cfg(test)]
mod tests {
    use conveyor_core::stats::{BackendStats, GroupMemberStats, PartitionStats, QueueStats};

    use super::render_queue_detail;
    use crate::exposition::{Exposition, Format};

    #[test]
    fn kafka_and_composite_families_render_one_sample_per_label() {
        let stats = QueueStats {
            partitions: vec![
                PartitionStats {
                    partition: 0,
                    high_watermark: 10,
                    committed: 7,
                    lag: 3,
                    in_flight: 2,
                },
                PartitionStats {
                    partition: 1,
                    high_watermark: 5,
                    committed: 5,
                    lag: 0,
                    in_flight: 0,
                },
            ],
            backends: vec![
                BackendStats {
                    name: "nats".into(),
                    primary: true,
                    healthy: true,
                    published: 9,
                    failed: 0,
                    divergence: 0,
                },
                BackendStats {
                    name: "kafka".into(),
                    primary: false,
                    healthy: false,
                    published: 7,
                    failed: 2,
                    divergence: 2,
                },
            ],
            group: Some(GroupMemberStats {
                assigned: vec![0, 1],
                stalled: true,
                stalls: 2,
                ..GroupMemberStats::default()
            }),
            ..QueueStats::default()
        };
        let mut exposition = Exposition::new();
        render_queue_detail(&mut exposition, &stats);
        let out = exposition.encode(Format::Prometheus);
        for sample in [
            "conveyor_kafka_group_stalls_total 2\n",
            "conveyor_kafka_group_stalled 1\n",
            "conveyor_kafka_assigned_partitions 2\n",
        ] {
            assert!(out.contains(sample), "{sample} in {out}");
        }
        assert!(
            out.contains("conveyor_kafka_consumer_lag{partition=\"0\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "conveyor_composite_failures_total{backend=\"kafka\",role=\"secondary\"} 2\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "conveyor_composite_backend_healthy{backend=\"kafka\",role=\"secondary\"} 0\n"
            ),
            "{out}"
        );
        let mut plain = Exposition::new();
        render_queue_detail(&mut plain, &QueueStats::default());
        assert!(plain.names().is_empty(), "other queues render nothing here");
    }
}
