//! The broker view: the topic's offsets and the group's commits, measured in the background,
//! from which the group's lag (the capacity bound) and the broker's health are read.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use rdkafka::{Offset, TopicPartitionList};

use crate::client::{REQUEST_TIMEOUT, blocking};
use crate::inner::{Inner, PartitionOffsets};
use crate::sync::lock;

/// How often a publisher measures the group's lag (its capacity bound) and the broker's health.
pub(crate) const REFRESH_INTERVAL: Duration = Duration::from_millis(500);

pub(crate) async fn refresh(inner: &Arc<Inner>) {
    let sent_before = inner.sent.load(Ordering::Relaxed);
    let measured = {
        let inner = Arc::clone(inner);
        blocking(move || measure(&inner)).await
    };
    let mut view = lock(&inner.view);
    match measured {
        Ok(partitions) => {
            if view.unhealthy.take().is_some() {
                tracing::info!(brokers = %inner.config.brokers, "Kafka reachable again");
            }
            view.partitions = partitions;
            inner.sent_at_view.store(sent_before, Ordering::Relaxed);
        }
        Err(error) => {
            if view.unhealthy.is_none() {
                tracing::warn!(brokers = %inner.config.brokers, %error, "Kafka unreachable");
            }
            view.unhealthy = Some(format!(
                "Kafka at {} unreachable: {error}",
                inner.config.brokers
            ));
        }
    }
}

fn measure(inner: &Inner) -> Result<Vec<PartitionOffsets>, String> {
    let topic = &inner.config.topic;
    let metadata = inner
        .observer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let ids: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut list = TopicPartitionList::with_capacity(ids.len());
    for id in &ids {
        list.add_partition(topic, *id);
    }
    let committed = inner
        .observer
        .committed_offsets(list, REQUEST_TIMEOUT)
        .map_err(|e| e.to_string())?;
    ids.into_iter()
        .map(|partition| {
            let (low, high) = inner
                .observer
                .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let committed =
                committed
                    .find_partition(topic, partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
            let produced = lock(&inner.produced_up_to)
                .get(&partition)
                .copied()
                .unwrap_or(0);
            Ok(PartitionOffsets {
                partition,
                low,
                high: high.max(produced).max(committed.unwrap_or(0)),
                committed,
            })
        })
        .collect()
}

/// Keeps the broker view fresh while the queue lives.
pub(crate) async fn watch_broker(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(REFRESH_INTERVAL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        refresh(&inner).await;
    }
}
