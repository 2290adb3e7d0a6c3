//! The member in its group: joining it (which starts the member's tasks), and watching the
//! group for partitions nobody consumes ([`crate::stall`]).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::client::{Detached, blocking, consumer_config};
use crate::inner::Inner;
use crate::lag::REFRESH_INTERVAL;
use crate::member::{GroupContext, Member, Shared, State};
use crate::stall::{Observed, StallWatch, Stuck, Verdict};
use crate::sync::lock;

impl Member {
    /// Joins the group and starts the member's tasks: receiving, watching the group, committing.
    pub(crate) fn join(inner: &Arc<Inner>) -> Result<Arc<Member>, String> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            room: Notify::new(),
        });
        let topic = inner.config.topic.clone();
        let context = GroupContext {
            shared: Arc::clone(&shared),
            topic: topic.clone(),
        };
        let consumer: StreamConsumer<GroupContext> =
            StreamConsumer::from_config_and_context(&consumer_config(&inner.config), context)
                .map_err(|e| format!("cannot create the Kafka consumer: {e}"))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| format!("cannot subscribe to topic '{topic}': {e}"))?;
        let (stop, stopped) = watch::channel(false);
        let member = Arc::new(Member {
            consumer: Detached::new(consumer),
            shared,
            topic,
            group: inner.config.group.clone(),
            max_held: inner.config.max_held.max(1),
            stop,
            stalled: Mutex::new(None),
        });
        tokio::spawn(Arc::clone(&member).receive(stopped.clone()));
        tokio::spawn(Arc::clone(&member).watch_group(
            Arc::downgrade(inner),
            StallWatch::new(inner.config.session_timeout * 2),
            stopped.clone(),
        ));
        tokio::spawn(
            Arc::clone(&member).commit_periodically(inner.config.commit_interval, stopped),
        );
        Ok(member)
    }

    /// Watches for partitions the group leaves unconsumed ([`crate::stall`]): says so (log,
    /// counter, stats, health) and rejoins the group with a fresh member id, which makes the
    /// coordinator compute the assignment again from the members it knows are alive.
    async fn watch_group(
        self: Arc<Self>,
        queue: Weak<Inner>,
        mut watch: StallWatch,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(REFRESH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let Some(inner) = queue.upgrade() else {
                return;
            };
            let observed: Vec<Observed> = {
                let view = lock(&inner.view);
                if view.unhealthy.is_some() {
                    // Nobody's commits move while the broker is away: not the group's fault.
                    continue;
                }
                view.partitions
                    .iter()
                    .map(|p| Observed {
                        partition: p.partition,
                        resume_at: p.resume_at(),
                        lag: (p.high - p.resume_at()).max(0) as u64,
                    })
                    .collect()
            };
            let owned: HashSet<i32> = lock(&self.shared.state).owned.keys().copied().collect();
            match watch.observe(Instant::now(), &observed, &owned) {
                Verdict::Fine => {
                    if lock(&self.stalled).take().is_some() {
                        tracing::info!(
                            "consumer group no longer stalled: the partitions are consumed again"
                        );
                    }
                }
                Verdict::Stalled(stuck) => {
                    *lock(&self.stalled) = Some(stall_reason(&stuck, watch.window()));
                }
                Verdict::Rejoin(stuck) => {
                    let reason = stall_reason(&stuck, watch.window());
                    inner.counters.stalls.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        owned = owned.len(),
                        partitions = observed.len(),
                        "{reason}; rejoining the group"
                    );
                    *lock(&self.stalled) = Some(reason);
                    drop(inner);
                    let member = Arc::clone(&self);
                    let rejoined = blocking(move || member.rejoin()).await;
                    if let Err(error) = rejoined {
                        tracing::warn!(%error, "rejoining the consumer group failed; retried after the next window");
                    }
                }
            }
        }
    }
}

/// Names the stuck partitions, their lag and the window, for the log, `/ready` and `/stats`.
fn stall_reason(stuck: &[Stuck], window: Duration) -> String {
    let partitions: Vec<String> = stuck
        .iter()
        .map(|s| format!("{} (lag {})", s.partition, s.lag))
        .collect();
    format!(
        "consumer group stalled: partitions {} have lag and no member committed on them for {}s \
         (twice the session timeout)",
        partitions.join(", "),
        window.as_secs()
    )
}
