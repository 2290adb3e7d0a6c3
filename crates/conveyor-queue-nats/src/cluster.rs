//! What a replicated stream's RAFT group looks like, for `stats` and `health`.
//!
//! JetStream answers a stream info request from the stream's leader, so while the stream has
//! no leader (an election after the leader's node died, or a lost quorum) the request goes
//! unanswered: that is reported as "no leader", never as the last leader seen.

use std::time::Duration;

use async_nats::jetstream::stream::ClusterInfo;
use conveyor_core::stats::{ReplicaStats, StreamCluster};

/// How long `health` and `stats` wait for each stream or consumer info: a healthy server
/// answers in milliseconds, and a processor's `/stats` (stats, then health) must answer within
/// the gateway's 5 s per instance even while the stream has no leader and nobody answers.
pub(crate) const INFO_WITHIN: Duration = Duration::from_millis(1500);

pub(crate) fn stream_cluster(info: &ClusterInfo) -> StreamCluster {
    StreamCluster {
        name: info.name.clone(),
        leader: info.leader.clone(),
        replicas: info
            .replicas
            .iter()
            .map(|peer| ReplicaStats {
                name: peer.name.clone(),
                current: peer.current,
                offline: peer.offline,
                active_ms: u64::try_from(peer.active.as_millis()).unwrap_or(u64::MAX),
                lag: peer.lag.unwrap_or(0),
            })
            .collect(),
    }
}

/// Why the stream cannot confirm publishes now, if it cannot: no leader, or fewer members
/// current than a quorum. A follower offline while a quorum holds is not a reason: intake
/// goes on, and `stats` shows it.
pub(crate) fn problem(stream: &str, cluster: Option<&ClusterInfo>) -> Option<String> {
    let cluster = cluster?;
    let Some(leader) = &cluster.leader else {
        return Some(format!(
            "stream '{stream}' has no leader (JetStream is electing one, or lost its quorum)"
        ));
    };
    let members = cluster.replicas.len() + 1;
    let current = 1 + cluster
        .replicas
        .iter()
        .filter(|r| r.current && !r.offline)
        .count();
    let quorum = members / 2 + 1;
    (current < quorum).then(|| {
        let behind: Vec<&str> = cluster
            .replicas
            .iter()
            .filter(|r| !r.current || r.offline)
            .map(|r| r.name.as_str())
            .collect();
        format!(
            "stream '{stream}' has {current} of {members} replicas current (leader {leader}; \
             offline or behind: {}), fewer than a quorum of {quorum}",
            behind.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::jetstream::stream::{ClusterInfo, PeerInfo};

    use super::problem;

    fn peer(name: &str, current: bool, offline: bool) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            current,
            active: Duration::from_millis(100),
            offline,
            lag: None,
        }
    }

    #[test]
    fn no_leader_or_no_quorum_is_a_problem_one_follower_down_is_not() {
        let cluster = |leader: Option<&str>, replicas| ClusterInfo {
            leader: leader.map(str::to_owned),
            replicas,
            ..ClusterInfo::default()
        };
        assert_eq!(problem("S", None), None, "a server without cluster info");
        let leaderless = cluster(None, vec![peer("b", true, false)]);
        assert!(problem("S", Some(&leaderless)).is_some_and(|p| p.contains("no leader")));
        let one_down = cluster(
            Some("a"),
            vec![peer("b", true, false), peer("c", false, true)],
        );
        assert_eq!(problem("S", Some(&one_down)), None);
        let two_down = cluster(
            Some("a"),
            vec![peer("b", false, false), peer("c", false, true)],
        );
        let reason = problem("S", Some(&two_down)).expect("no quorum");
        assert!(
            reason.contains("1 of 3") && reason.contains("b, c"),
            "{reason}"
        );
    }
}
