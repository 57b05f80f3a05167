//! What every controller shares: the context, per-object backoff, leader election,
//! the metrics registry, the HTTP endpoints, one reconcile wrapper, one status
//! write, object keys and the condition types and reasons.

pub mod backoff;
pub mod conditions;
pub mod context;
pub mod http_server;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod status;

use kube::ResourceExt;
use std::sync::{Mutex, MutexGuard};

/// The `namespace/name` key of an object: what backoff, memos and logs key by.
pub fn object_key(object: &impl ResourceExt) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// Locks `mutex`, carrying on past a panic in another holder: every value the
/// operator keeps behind a mutex is a cache or a memo that stays consistent
/// between statements, so a poisoned lock holds nothing half-written.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_are_namespace_slash_name() {
        let mut map = k8s_openapi::api::core::v1::ConfigMap::default();
        map.metadata.namespace = Some("stores".into());
        map.metadata.name = Some("models".into());
        assert_eq!(object_key(&map), "stores/models");
        map.metadata.namespace = None;
        assert_eq!(object_key(&map), "/models");
    }
}
