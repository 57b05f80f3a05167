//! Agent pods deleted lately, from a watch of the pods the agent DaemonSets run
//! (those labelled `shoal.dev/pool`). A token bound to one of them is no longer
//! taken from the token cache: the next request asks the API server again, which
//! refuses a token whose pod is gone. Without this, a token stayed accepted for the
//! cache's whole lifetime after its pod was deleted.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The label every agent pod carries (set by the EdgePool controller's DaemonSet).
pub const AGENT_POD_LABEL: &str = "shoal.dev/pool";
/// How long a deletion is remembered: longer than any cached token verdict.
pub const REMEMBER_FOR: Duration = Duration::from_secs(5 * 60);

#[derive(Default)]
pub struct DeletedPods {
    uids: Mutex<HashMap<String, Instant>>,
}

impl DeletedPods {
    /// Notes that the pod `uid` was deleted at `now`; forgets deletions older than
    /// [`REMEMBER_FOR`], so the memory holds only the last few minutes' deletions.
    pub fn record(&self, uid: String, now: Instant) {
        let mut uids = crate::runtime::lock(&self.uids);
        uids.retain(|_, deleted| now.saturating_duration_since(*deleted) < REMEMBER_FOR);
        uids.insert(uid, now);
    }

    /// Whether the pod `uid` was deleted within [`REMEMBER_FOR`].
    pub fn contains(&self, uid: &str, now: Instant) -> bool {
        crate::runtime::lock(&self.uids)
            .get(uid)
            .is_some_and(|deleted| now.saturating_duration_since(*deleted) < REMEMBER_FOR)
    }

    pub fn len(&self) -> usize {
        crate::runtime::lock(&self.uids).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Follows deletions of agent pods (metadata only) until the process ends.
    pub async fn follow(&self, client: Client, namespace: Option<String>) {
        let api: Api<PartialObjectMeta<Pod>> = match &namespace {
            Some(namespace) => Api::namespaced(client, namespace),
            None => Api::all(client),
        };
        let config = watcher::Config::default()
            .labels(AGENT_POD_LABEL)
            .any_semantic();
        let mut events = std::pin::pin!(watcher(api, config).default_backoff());
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = pod.uid() {
                        self.record(uid, Instant::now());
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "agent pod watch failed; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_deletions_for_a_while_then_forgets_them() {
        let deleted = DeletedPods::default();
        let start = Instant::now();
        assert!(!deleted.contains("a", start));
        deleted.record("a".into(), start);
        assert!(deleted.contains("a", start + Duration::from_secs(60)));
        assert!(!deleted.contains("b", start));
        assert!(!deleted.contains("a", start + REMEMBER_FOR));
        // Old entries are dropped on the next record.
        deleted.record("b".into(), start + REMEMBER_FOR);
        assert_eq!(deleted.len(), 1);
    }
}
