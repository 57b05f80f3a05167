//! Which agents of a pool are canaries, and how many may be. Pure.
//!
//! Every node gets a rank key: a hash of the rollout's namespace and name and the
//! node's name. A pool's canaries are the `count` nodes with the lowest keys, so the
//! same nodes stay canaries as the weight grows, across operator restarts, and on
//! every replica, without storing a list of nodes anywhere.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

/// The node's rank key for one rollout: lower keys become canaries first.
pub fn rank_key(namespace: &str, rollout: &str, node: &str) -> u64 {
    let digest = Sha256::digest(format!("{namespace}/{rollout}/{node}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// A pool's nodes ranked for one rollout, computed once per change of the pool's
/// membership: thousands of agents asking for their assignment after a step then
/// cost a binary search each, not a pass over the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryOrder {
    namespace: String,
    rollout: String,
    /// (rank key, node), ascending. Ties, vanishingly rare, go by node name.
    ranked: Vec<(u64, String)>,
}

impl CanaryOrder {
    pub fn new<'a>(
        namespace: &str,
        rollout: &str,
        pool_nodes: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut ranked: Vec<(u64, String)> = pool_nodes
            .into_iter()
            .map(|node| (rank_key(namespace, rollout, node), node.to_string()))
            .collect();
        ranked.sort();
        Self {
            namespace: namespace.to_string(),
            rollout: rollout.to_string(),
            ranked,
        }
    }

    /// Whether `node` (a member of the pool) is among the `count` lowest-ranked.
    pub fn is_canary(&self, node: &str, count: usize) -> bool {
        if count == 0 {
            return false;
        }
        let own = rank_key(&self.namespace, &self.rollout, node);
        let below = self
            .ranked
            .partition_point(|(key, name)| (*key, name.as_str()) < (own, node));
        below < count
    }

    /// The pool's nodes in canary order (lowest rank key first).
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.ranked.iter().map(|(_, node)| node.as_str())
    }
}

/// Agents that must serve the new version at `weight` percent of `agents`: rounded
/// up, so any weight above 0 moves at least one agent.
pub fn target_count(weight: i32, agents: i32) -> i32 {
    let weight = weight.clamp(0, 100) as i64;
    ((weight * agents.max(0) as i64 + 99) / 100) as i32
}

/// `maxUnavailable` as a number of agents of a pool of `agents`: a number as is, a
/// percent rounded down; never below 1, or a rollout could never move.
pub fn max_unavailable(value: &IntOrString, agents: i32) -> i32 {
    let count = match value {
        IntOrString::Int(n) => *n,
        IntOrString::String(text) => match text.strip_suffix('%').map(str::parse::<i64>) {
            Some(Ok(percent)) => (percent.clamp(0, 100) * agents.max(0) as i64 / 100) as i32,
            _ => text.parse().unwrap_or(1),
        },
    };
    count.max(1)
}

/// How many agents of a pool to assign the new version now: toward `target`, but
/// with at most `max_unavailable` assigned and not yet serving it (`ready` do). Never
/// takes back an assignment already made below the target.
pub fn next_updated(previous: i32, target: i32, ready: i32, max_unavailable: i32) -> i32 {
    let allowed = ready.saturating_add(max_unavailable);
    target.min(allowed).max(previous.min(target)).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("store-{i:03}")).collect()
    }

    #[test]
    fn canaries_grow_as_a_prefix_and_are_stable() {
        let names = nodes(40);
        let pool: Vec<&str> = names.iter().map(String::as_str).collect();
        let order = CanaryOrder::new("shop", "ranker", pool.iter().copied());
        let canaries = |count: usize| -> Vec<&str> {
            pool.iter()
                .copied()
                .filter(|node| order.is_canary(node, count))
                .collect()
        };
        let mut previous: Vec<&str> = Vec::new();
        for count in [0, 1, 4, 10, 20, 40] {
            let now = canaries(count);
            assert_eq!(now.len(), count);
            assert!(
                previous.iter().all(|node| now.contains(node)),
                "a canary stays one"
            );
            previous = now;
        }
        let mut first_four: Vec<&str> = order.nodes().take(4).collect();
        first_four.sort();
        assert_eq!(first_four, canaries(4));
    }

    #[test]
    fn the_binary_search_agrees_with_counting_lower_ranks() {
        let names = nodes(300);
        let order = CanaryOrder::new("shop", "ranker", names.iter().map(String::as_str));
        for count in [0, 1, 7, 30, 150, 299, 300, 301] {
            for node in &names {
                let own = (rank_key("shop", "ranker", node), node.as_str());
                let below = names
                    .iter()
                    .filter(|other| (rank_key("shop", "ranker", other), other.as_str()) < own)
                    .count();
                assert_eq!(
                    order.is_canary(node, count),
                    below < count,
                    "{node} at {count}"
                );
            }
        }
    }

    #[test]
    fn another_rollout_picks_other_canaries() {
        let names = nodes(40);
        let pool: Vec<&str> = names.iter().map(String::as_str).collect();
        let a = CanaryOrder::new("shop", "ranker", pool.iter().copied());
        let b = CanaryOrder::new("shop", "search", pool.iter().copied());
        assert!(a.nodes().take(5).ne(b.nodes().take(5)));
    }

    #[test]
    fn target_counts_round_up() {
        assert_eq!(target_count(0, 10), 0);
        assert_eq!(target_count(1, 10), 1);
        assert_eq!(target_count(20, 10), 2);
        assert_eq!(target_count(25, 10), 3);
        assert_eq!(target_count(100, 10), 10);
        assert_eq!(target_count(50, 0), 0);
        assert_eq!(target_count(150, 4), 4);
    }

    #[test]
    fn max_unavailable_numbers_and_percents() {
        let s = |t: &str| IntOrString::String(t.into());
        assert_eq!(max_unavailable(&IntOrString::Int(3), 10), 3);
        assert_eq!(max_unavailable(&IntOrString::Int(0), 10), 1);
        assert_eq!(max_unavailable(&s("25%"), 10), 2);
        assert_eq!(max_unavailable(&s("25%"), 2), 1);
        assert_eq!(max_unavailable(&s("100%"), 7), 7);
        assert_eq!(max_unavailable(&s("5"), 7), 5);
    }

    #[test]
    fn updates_move_at_most_max_unavailable_ahead_of_ready() {
        // target 10, nothing ready, 2 at a time.
        assert_eq!(next_updated(0, 10, 0, 2), 2);
        assert_eq!(next_updated(2, 10, 1, 2), 3);
        assert_eq!(next_updated(3, 10, 3, 2), 5);
        assert_eq!(next_updated(9, 10, 9, 2), 10);
        // Already assigned agents keep their assignment when some stop reporting ready.
        assert_eq!(next_updated(5, 10, 0, 2), 5);
        // The target shrank (weight lowered by a new rollout): cap at the target.
        assert_eq!(next_updated(5, 3, 5, 2), 3);
        assert_eq!(next_updated(0, 0, 0, 2), 0);
    }
}
