//! What every controller shares: the API client, the artifact store, the HTTP
//! client for model sources, metrics and per-object backoff.

use crate::artifacts::store::ArtifactStore;
use crate::runtime::backoff::Backoff;
use crate::runtime::metrics::Metrics;
use std::sync::Arc;

pub struct Context {
    pub client: kube::Client,
    pub artifacts: ArtifactStore,
    pub http: reqwest::Client,
    /// The networks model sources may reach beyond public addresses (the same
    /// policy `http` applies when it resolves names and follows redirects).
    pub source_policy: Arc<crate::artifacts::source_policy::SourcePolicy>,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
    /// Largest model source the operator accepts, in bytes.
    pub max_model_bytes: u64,
    /// Compressions allowed to run at once (each takes a core and a few model copies of memory).
    pub compression_slots: tokio::sync::Semaphore,
    /// Finished compressions, so that none runs twice for the same inputs.
    pub compression_records: crate::compression::records::Records,
}

/// The one field manager for everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "shoal-operator";

/// Sends on `synced` once `store` holds its first full list.
///
/// kube-runtime's `Store::wait_until_ready` wakes only the last task that polled it
/// when several wait at once (the Controller waits too), so poll it with a short
/// timeout until it resolves: once ready, every later call returns at once.
pub async fn signal_when_synced<K>(
    store: kube::runtime::reflector::Store<K>,
    what: &'static str,
    synced: tokio::sync::oneshot::Sender<()>,
) where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(
            std::time::Duration::from_millis(250),
            store.wait_until_ready(),
        )
        .await
        {
            Ok(Ok(())) => {
                tracing::info!("{what} cache synced");
                let _ = synced.send(());
                return;
            }
            Ok(Err(_writer_dropped)) => return,
            Err(_still_waiting) => continue,
        }
    }
}
