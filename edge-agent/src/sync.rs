//! Managed mode: keep the models this node serves equal to its assignment from
//! the operator. Load before unload: a new version is downloaded, verified,
//! loaded and warmed up beside the old one, then swapped in; any failure leaves
//! the old version serving and is reported. The last assignment served completely
//! is kept on disk so a restart without the control plane serves at once.

use crate::cache::Cache;
use crate::control_plane::{ControlPlane, Poll};
use crate::registry::ModelRegistry;
use shoal_api::agent_protocol::{AgentReport, AssignedModel, Assignment};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long each long-poll waits for a change.
const POLL_WAIT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

pub struct Syncer {
    pub registry: Arc<ModelRegistry>,
    pub cache: Cache,
    pub control_plane: ControlPlane,
    pub node: String,
    /// RFC 3339 time the agent started; reports carry it so restarts are visible.
    pub started_at: String,
    /// Most bytes the artifact cache may hold.
    pub cache_limit: u64,
    /// Versions whose artifact tract could not load: retrying the same bytes
    /// cannot succeed, so they wait for a new assignment.
    unloadable: Mutex<BTreeSet<(String, String)>>,
}

impl Syncer {
    pub fn new(
        registry: Arc<ModelRegistry>,
        cache: Cache,
        control_plane: ControlPlane,
        node: &str,
        started_at: String,
        cache_limit: u64,
    ) -> Syncer {
        Syncer {
            registry,
            cache,
            control_plane,
            node: node.to_string(),
            started_at,
            cache_limit,
            unloadable: Mutex::new(BTreeSet::new()),
        }
    }

    /// Serves the last-known-good assignment from the cache, before any network
    /// call. Returns how many models serve.
    pub async fn serve_last_known_good(&self) -> usize {
        let Some(assignment) = self.cache.last_known_good() else {
            return 0;
        };
        // A node that had nothing assigned at its last sync is ready with nothing,
        // also while the operator is out of reach.
        self.registry
            .set_nothing_assigned(assignment.models.is_empty());
        let mut serving = 0;
        for model in &assignment.models {
            match self.cache.read_artifact(&model.artifact_digest) {
                Ok(Some(bytes)) => {
                    if self.load_and_swap(model, bytes).await {
                        serving += 1;
                    }
                }
                Ok(None) => {
                    tracing::warn!(model = %model.name, "last-known-good artifact missing from the cache")
                }
                Err(error) => {
                    tracing::warn!(model = %model.name, %error, "cannot read cached artifact")
                }
            }
        }
        tracing::info!(
            serving,
            "serving the last-known-good assignment from the cache"
        );
        serving
    }

    /// Makes the served models equal `assignment`. Returns true when every
    /// assigned model serves at its assigned version.
    pub async fn apply(&self, assignment: &Assignment) -> bool {
        // Before anything loads or retires, so readiness never dips on the way to
        // an empty assignment; a new non-empty one keeps the agent ready only
        // while some model still serves.
        self.registry
            .set_nothing_assigned(assignment.models.is_empty());
        let mut complete = true;
        for model in &assignment.models {
            let serving = self.registry.get(&model.name);
            if serving.is_some_and(|s| s.version == model.version) {
                continue;
            }
            let key = (model.name.clone(), model.version.clone());
            if self
                .unloadable
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&key)
            {
                complete = false;
                continue;
            }
            let bytes = match self.fetch(model).await {
                Ok(bytes) => bytes,
                Err(error) => {
                    tracing::warn!(model = %model.name, version = %model.version, %error, "download failed; the previous version keeps serving");
                    self.registry
                        .mark_failed(&model.name, &model.version, &error);
                    complete = false;
                    continue;
                }
            };
            if !self.load_and_swap(model, bytes).await {
                self.unloadable
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key);
                complete = false;
            }
        }
        let assigned: BTreeSet<&str> = assignment.models.iter().map(|m| m.name.as_str()).collect();
        for name in self.registry.names() {
            if !assigned.contains(name.as_str()) {
                tracing::info!(model = %name, "no longer assigned; unloading");
                self.registry.retire(&name);
            }
        }
        complete
    }

    async fn fetch(&self, model: &AssignedModel) -> Result<Vec<u8>, String> {
        if self
            .cache
            .read_artifact(&model.artifact_digest)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            self.cache
                .ensure_room(model.artifact_bytes, self.cache_limit)
                .map_err(|e| e.to_string())?;
        }
        let path = self
            .control_plane
            .download(model, &self.cache)
            .await
            .map_err(|e| e.to_string())?;
        tokio::fs::read(&path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
    }

    /// Loads off the async runtime, then swaps. False if the model cannot load.
    async fn load_and_swap(&self, model: &AssignedModel, bytes: Vec<u8>) -> bool {
        let registry = self.registry.clone();
        let (name, version) = (model.name.clone(), model.version.clone());
        let loaded =
            tokio::task::spawn_blocking(move || registry.load_version(&name, &version, &bytes))
                .await;
        match loaded {
            Ok(Ok(loaded)) => {
                self.registry.swap(loaded);
                true
            }
            Ok(Err(_load_error)) => false, // the registry recorded and logged it
            Err(join_error) => {
                self.registry.mark_failed(
                    &model.name,
                    &model.version,
                    &format!("loading was interrupted: {join_error}"),
                );
                false
            }
        }
    }

    /// Follows the node's assignment until the process ends. Network errors back
    /// off and retry; what serves keeps serving meanwhile.
    pub async fn run(self: Arc<Self>) {
        let mut etag: Option<String> = None;
        let mut retry = FIRST_RETRY;
        loop {
            match self
                .control_plane
                .poll_assignment(etag.as_deref(), POLL_WAIT)
                .await
            {
                Ok(Poll::Unchanged) => retry = FIRST_RETRY,
                Ok(Poll::Changed {
                    assignment,
                    etag: new_etag,
                }) => {
                    retry = FIRST_RETRY;
                    if self.apply(&assignment).await {
                        if let Err(error) = self.cache.save_last_known_good(&assignment) {
                            tracing::warn!(%error, "cannot record the last-known-good assignment");
                        }
                        let keep: Vec<String> = assignment
                            .models
                            .iter()
                            .map(|m| m.artifact_digest.clone())
                            .collect();
                        self.cache.remove_unused(&keep);
                        etag = new_etag;
                    } else {
                        // Not everything serves: ask again soon instead of waiting
                        // for a change that may never come.
                        etag = None;
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry, "assignment poll failed; serving what is loaded");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// Sends a report every `every` until the process ends.
    pub async fn report_every(self: Arc<Self>, every: Duration) {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            let report = AgentReport {
                node: self.node.clone(),
                agent_start_time: self.started_at.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                models: self.registry.model_reports(),
            };
            if let Err(error) = self.control_plane.report(&report).await {
                tracing::debug!(%error, "report not delivered; the next one carries the same cumulative counters");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// A syncer on a cache in `dir`; its control plane is a closed local port and
    /// is never called by these tests.
    fn syncer(dir: &std::path::Path) -> Syncer {
        let registry = Arc::new(ModelRegistry::new(Arc::new(Metrics::new())));
        let cache = Cache::open(dir).expect("cache opens");
        let control_plane =
            ControlPlane::new("http://127.0.0.1:9", "n1", None, None).expect("client");
        Syncer::new(
            registry,
            cache,
            control_plane,
            "n1",
            "2025-01-01T00:00:00Z".into(),
            1 << 20,
        )
    }

    fn empty() -> Assignment {
        Assignment {
            node: "n1".into(),
            models: Vec::new(),
        }
    }

    #[tokio::test]
    async fn an_agent_with_nothing_assigned_is_ready_from_the_cache_and_after_a_sync() {
        let temp = tempfile::tempdir().expect("tempdir");
        let first = syncer(temp.path());
        assert!(!first.registry.ready(), "no assignment known yet");
        assert!(first.apply(&empty()).await);
        assert!(first.registry.ready());
        first.cache.save_last_known_good(&empty()).expect("saved");

        // Restarted while the operator is unreachable: the cached empty
        // assignment alone makes it ready.
        let restarted = syncer(temp.path());
        assert_eq!(restarted.serve_last_known_good().await, 0);
        assert!(restarted.registry.ready());
    }

    #[tokio::test]
    async fn an_agent_whose_cached_models_cannot_serve_is_not_ready() {
        let temp = tempfile::tempdir().expect("tempdir");
        let cached = Assignment {
            node: "n1".into(),
            models: vec![AssignedModel {
                name: "ranker".into(),
                version: "1".into(),
                artifact_digest: format!("sha256:{}", "0".repeat(64)),
                artifact_bytes: 10,
                download_path: "/v1/artifacts/x".into(),
            }],
        };
        let syncer = syncer(temp.path());
        syncer.cache.save_last_known_good(&cached).expect("saved");
        // The artifact is missing from the cache: nothing serves.
        assert_eq!(syncer.serve_last_known_good().await, 0);
        assert!(!syncer.registry.ready());
        // The operator then assigns nothing: ready.
        assert!(syncer.apply(&empty()).await);
        assert!(syncer.registry.ready());
    }
}
