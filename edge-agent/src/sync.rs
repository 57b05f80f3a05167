//! Managed mode: keep the models this node serves equal to its assignment from
//! the operator. Load before unload: a new version is downloaded, verified,
//! loaded and warmed up beside the old one, then swapped in; any failure leaves
//! the old version serving and is reported. The last assignment served completely
//! is kept on disk so a restart without the control plane serves at once.

use crate::cache::{Cache, CacheError};
use crate::control_plane::{ControlPlane, ControlPlaneError, Poll};
use crate::registry::ModelRegistry;
use shoal_api::agent_protocol::{AgentReport, AssignedModel, Assignment};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Tries of one report when the control plane answers 503 (a follower replica) or
/// cannot be reached, one [`REPORT_RETRY`] apart, all within the report interval.
const REPORT_ATTEMPTS: u32 = 4;
const REPORT_RETRY: Duration = Duration::from_secs(1);
/// How long each long-poll waits for a change.
const POLL_WAIT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// The wait before downloading an artifact again after the control plane sent
/// bytes that cannot be it; doubles with every such failure in a row.
const FIRST_ARTIFACT_BACKOFF: Duration = Duration::from_secs(30);
const MAX_ARTIFACT_BACKOFF: Duration = Duration::from_secs(600);

/// The wait before the next download of an artifact whose last `failures`
/// downloads in a row brought the wrong bytes: 30 s, doubling to 10 min.
pub fn artifact_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_ARTIFACT_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_ARTIFACT_BACKOFF)
}

/// Artifacts, by digest, whose downloads brought the wrong bytes: how many times
/// in a row, and the earliest time of the next attempt.
#[derive(Debug, Default)]
pub struct BadArtifacts {
    entries: HashMap<String, (u32, Instant)>,
}

impl BadArtifacts {
    /// Records one more failed download of `digest` at `now`; returns the wait
    /// before the next attempt.
    pub fn record_failure(&mut self, digest: &str, now: Instant) -> Duration {
        let failures = self.entries.get(digest).map_or(0, |(count, _)| *count) + 1;
        let wait = artifact_backoff(failures);
        self.entries
            .insert(digest.to_string(), (failures, now + wait));
        wait
    }

    /// The wait left at `now` before `digest` may be downloaded again, if any.
    pub fn wait_left(&self, digest: &str, now: Instant) -> Option<Duration> {
        let (_, retry_at) = self.entries.get(digest)?;
        let left = retry_at.saturating_duration_since(now);
        (!left.is_zero()).then_some(left)
    }

    /// Forgets `digest` (it downloaded correctly).
    pub fn forget(&mut self, digest: &str) {
        self.entries.remove(digest);
    }

    /// Forgets every failure (the assignment changed: new bytes may be there).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

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
    /// Artifacts the control plane sent wrong bytes for, backing off per digest
    /// until the assignment changes.
    bad_artifacts: Mutex<BadArtifacts>,
    /// The assignment `apply` saw last, to tell a new one from a repeated one.
    last_applied: Mutex<Option<Assignment>>,
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
            bad_artifacts: Mutex::new(BadArtifacts::default()),
            last_applied: Mutex::new(None),
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
        // Downloads an earlier assignment started and this one no longer needs
        // would hold cache room that this one's downloads may need.
        let assigned_digests: Vec<String> = assignment
            .models
            .iter()
            .map(|m| m.artifact_digest.clone())
            .collect();
        self.cache.remove_stale_partials(&assigned_digests);
        {
            let mut last_applied = lock(&self.last_applied);
            if last_applied.as_ref() != Some(assignment) {
                lock(&self.bad_artifacts).clear();
                *last_applied = Some(assignment.clone());
            }
        }
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
            let digest = &model.artifact_digest;
            if let Some(wait) = lock(&self.bad_artifacts).wait_left(digest, Instant::now()) {
                // Its Failed state, with the reason and the wait, is already reported.
                tracing::debug!(model = %model.name, version = %model.version, ?wait, "artifact download backing off");
                complete = false;
                continue;
            }
            let bytes = match self.fetch(model).await {
                Ok(bytes) => {
                    lock(&self.bad_artifacts).forget(digest);
                    bytes
                }
                Err(error) => {
                    let mut message = error.to_string();
                    if error.is_bad_artifact() {
                        let wait = lock(&self.bad_artifacts).record_failure(digest, Instant::now());
                        message =
                            format!("{message}; next download attempt in {}s", wait.as_secs());
                    }
                    tracing::warn!(model = %model.name, version = %model.version, error = %message, "download failed; the previous version keeps serving");
                    self.registry
                        .mark_failed(&model.name, &model.version, &message);
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

    async fn fetch(&self, model: &AssignedModel) -> Result<Vec<u8>, ControlPlaneError> {
        if self.cache.read_artifact(&model.artifact_digest)?.is_none() {
            self.cache.ensure_room_for(
                &model.artifact_digest,
                model.artifact_bytes,
                self.cache_limit,
            )?;
        }
        let path = self
            .control_plane
            .download(model, &self.cache, self.cache_limit)
            .await?;
        tokio::fs::read(&path).await.map_err(|source| {
            ControlPlaneError::Cache(CacheError::Io {
                what: "cannot read",
                path,
                source,
            })
        })
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
            let sent = tokio::time::Instant::now();
            for attempt in 1..=REPORT_ATTEMPTS {
                match self.control_plane.report(&report).await {
                    Ok(()) => break,
                    // A replica that is not the leader, or one that is restarting:
                    // another try soon (on a new connection) may reach the leader.
                    Err(error)
                        if error.is_worth_retrying_soon()
                            && attempt < REPORT_ATTEMPTS
                            && sent.elapsed() + REPORT_RETRY < every =>
                    {
                        tracing::debug!(%error, attempt, "report not delivered; trying again");
                        tokio::time::sleep(REPORT_RETRY).await;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "report not delivered; the next one carries the same cumulative counters");
                        break;
                    }
                }
            }
        }
    }
}

/// The syncer's state stays consistent between statements, so a panic in one
/// holder does not make it unusable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::fs;

    /// A syncer on a cache in `dir`; its control plane is a closed local port and
    /// is never called by these tests.
    fn syncer(dir: &std::path::Path) -> Syncer {
        syncer_with(dir, "http://127.0.0.1:9", 1 << 20)
    }

    /// A syncer on a cache in `dir` holding at most `cache_limit` bytes, whose
    /// control plane is at `url`.
    fn syncer_with(dir: &std::path::Path, url: &str, cache_limit: u64) -> Syncer {
        let registry = Arc::new(ModelRegistry::new(Arc::new(Metrics::new())));
        let cache = Cache::open(dir).expect("cache opens");
        let control_plane = ControlPlane::new(url, "n1", None, None).expect("client");
        Syncer::new(
            registry,
            cache,
            control_plane,
            "n1",
            "2025-01-01T00:00:00Z".into(),
            cache_limit,
        )
    }

    fn digest_of(bytes: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    /// An assigned model whose artifact is `bytes`, `declared` bytes long by the
    /// assignment, downloaded from the artifact path of its digest.
    fn assigned(name: &str, bytes: &[u8], declared: u64) -> AssignedModel {
        let digest = digest_of(bytes);
        AssignedModel {
            name: name.into(),
            version: "1".into(),
            download_path: shoal_api::agent_protocol::artifact_path(
                digest.trim_start_matches("sha256:"),
            ),
            artifact_digest: digest,
            artifact_bytes: declared,
        }
    }

    /// A control plane on 127.0.0.1 that answers every artifact download with
    /// `body` (honouring `Range: bytes=N-` with 206) and records the `Range`
    /// header of each request ("" for none).
    struct ArtifactServer {
        url: String,
        ranges: Arc<Mutex<Vec<String>>>,
    }

    impl ArtifactServer {
        async fn start(body: Vec<u8>) -> ArtifactServer {
            use axum::http::{HeaderMap, StatusCode, header};
            use axum::response::IntoResponse;
            let ranges = Arc::new(Mutex::new(Vec::new()));
            let seen = ranges.clone();
            let body = Arc::new(body);
            let handler = move |headers: HeaderMap| {
                let (seen, body) = (seen.clone(), body.clone());
                async move {
                    let range = headers
                        .get(header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().expect("ranges").push(range.clone());
                    let start = range
                        .strip_prefix("bytes=")
                        .and_then(|r| r.strip_suffix('-'))
                        .and_then(|n| n.parse::<usize>().ok());
                    match start {
                        Some(start) if start <= body.len() => {
                            (StatusCode::PARTIAL_CONTENT, body[start..].to_vec()).into_response()
                        }
                        _ => (StatusCode::OK, body.to_vec()).into_response(),
                    }
                }
            };
            let app = axum::Router::new().route(
                "/agent/v1/artifacts/sha256/{hex}",
                axum::routing::get(handler),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binds");
            let url = format!("http://{}", listener.local_addr().expect("address"));
            tokio::spawn(async move { axum::serve(listener, app).await });
            ArtifactServer { url, ranges }
        }

        fn ranges(&self) -> Vec<String> {
            self.ranges.lock().expect("ranges").clone()
        }
    }

    fn error_of(syncer: &Syncer, name: &str) -> String {
        syncer
            .registry
            .statuses()
            .into_iter()
            .find(|status| status.name == name)
            .and_then(|status| status.error)
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_resumed_download_fits_beside_the_stable_artifact_and_stale_partials_go() {
        let temp = tempfile::tempdir().expect("tempdir");
        let stable = vec![b's'; 30];
        let new = vec![b'n'; 60];
        let server = ArtifactServer::start(new.clone()).await;
        let syncer = syncer_with(temp.path(), &server.url, 100);
        let cache = &syncer.cache;
        // The stable version's 30 B artifact is cached; 40 of the new version's
        // 60 B arrived before the connection broke; a 20 B download of a digest no
        // longer assigned was left behind.
        let stable_digest = digest_of(&stable);
        fs::write(cache.partial_path(&stable_digest).expect("path"), &stable).expect("write");
        cache.commit_download(&stable_digest).expect("commits");
        let new_digest = digest_of(&new);
        fs::write(cache.partial_path(&new_digest).expect("path"), &new[..40]).expect("write");
        let stale = cache.partial_path(&digest_of(b"stale")).expect("path");
        fs::write(&stale, [b'x'; 20]).expect("write");

        let assignment = Assignment {
            node: "n1".into(),
            models: vec![assigned("stable", &stable, 30), assigned("new", &new, 60)],
        };
        // Neither artifact is an ONNX model, so neither loads: the point is the cache.
        assert!(!syncer.apply(&assignment).await);
        assert_eq!(
            cache.read_artifact(&new_digest).expect("reads"),
            Some(new.clone()),
            "the download completes; the new model's error: {}",
            error_of(&syncer, "new")
        );
        assert_eq!(server.ranges(), vec!["bytes=40-".to_string()], "resumed");
        assert!(!stale.exists(), "the stale partial download is removed");
        assert!(
            cache
                .read_artifact(&stable_digest)
                .expect("reads")
                .is_some(),
            "the stable artifact stays"
        );
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

    #[test]
    fn artifact_backoff_doubles_from_30_seconds_to_10_minutes() {
        let waits: Vec<u64> = (1..=8).map(|n| artifact_backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![30, 60, 120, 240, 480, 600, 600, 600]);
        assert_eq!(artifact_backoff(u32::MAX), Duration::from_secs(600));
    }

    #[test]
    fn bad_artifacts_wait_per_digest_and_forget_on_clear() {
        let start = Instant::now();
        let mut bad = BadArtifacts::default();
        assert_eq!(bad.wait_left("a", start), None);
        assert_eq!(bad.record_failure("a", start), Duration::from_secs(30));
        assert_eq!(
            bad.wait_left("a", start + Duration::from_secs(10)),
            Some(Duration::from_secs(20))
        );
        assert_eq!(bad.wait_left("b", start), None, "per digest");
        assert_eq!(bad.wait_left("a", start + Duration::from_secs(30)), None);
        let later = start + Duration::from_secs(30);
        assert_eq!(bad.record_failure("a", later), Duration::from_secs(60));
        assert!(
            bad.wait_left("a", later + Duration::from_secs(59))
                .is_some()
        );
        bad.clear();
        assert_eq!(bad.wait_left("a", later), None);
        bad.record_failure("b", start);
        bad.forget("b");
        assert_eq!(bad.wait_left("b", start), None);
        assert_eq!(
            bad.record_failure("b", start),
            Duration::from_secs(30),
            "from the start"
        );
    }

    fn assignment_of(models: Vec<AssignedModel>) -> Assignment {
        Assignment {
            node: "n1".into(),
            models,
        }
    }

    #[tokio::test]
    async fn a_download_longer_than_the_assignment_declares_is_stopped_and_discarded() {
        let temp = tempfile::tempdir().expect("tempdir");
        // A lying control plane: 1 MiB for an artifact the assignment says is 100 B.
        let server = ArtifactServer::start(vec![b'x'; 1 << 20]).await;
        let syncer = syncer_with(temp.path(), &server.url, 1 << 30);
        let model = assigned("lying", b"the real artifact", 100);
        assert!(!syncer.apply(&assignment_of(vec![model.clone()])).await);
        let error = error_of(&syncer, "lying");
        assert!(
            error.contains("more than the 100 bytes the assignment declares"),
            "{error}"
        );
        let partial = syncer
            .cache
            .partial_path(&model.artifact_digest)
            .expect("path");
        assert!(!partial.exists(), "the partial download is removed");
    }

    #[tokio::test]
    async fn a_download_of_undeclared_size_stops_at_the_cache_limit() {
        let temp = tempfile::tempdir().expect("tempdir");
        let server = ArtifactServer::start(vec![b'x'; 1 << 20]).await;
        let syncer = syncer_with(temp.path(), &server.url, 1000);
        let model = assigned("unsized", b"the real artifact", 0);
        assert!(!syncer.apply(&assignment_of(vec![model.clone()])).await);
        let error = error_of(&syncer, "unsized");
        assert!(
            error.contains("more than the 1000 bytes of the cache limit"),
            "{error}"
        );
        let partial = syncer
            .cache
            .partial_path(&model.artifact_digest)
            .expect("path");
        assert!(!partial.exists(), "the partial download is removed");
    }

    #[tokio::test]
    async fn a_digest_mismatch_is_not_downloaded_again_until_its_backoff_ends_or_the_assignment_changes()
     {
        let temp = tempfile::tempdir().expect("tempdir");
        let server = ArtifactServer::start(b"tampered".to_vec()).await;
        let syncer = syncer_with(temp.path(), &server.url, 1 << 20);
        let first = assignment_of(vec![assigned("m", b"the real bytes", 8)]);
        assert!(!syncer.apply(&first).await);
        let error = error_of(&syncer, "m");
        assert!(error.contains("but the assignment says"), "{error}");
        // The sync loop asks again soon after an incomplete assignment; the
        // same bytes would fail the same way.
        assert!(!syncer.apply(&first).await);
        assert_eq!(
            server.ranges().len(),
            1,
            "downloaded again within the backoff"
        );
        let error = error_of(&syncer, "m");
        assert!(error.contains("next download attempt in 30s"), "{error}");
        // A new assignment (the operator fixed the artifact or the Model) is tried at once.
        let mut changed = first.clone();
        changed.models[0].version = "2".into();
        assert!(!syncer.apply(&changed).await);
        assert_eq!(
            server.ranges().len(),
            2,
            "a changed assignment downloads at once"
        );
    }

    #[tokio::test]
    async fn a_report_refused_by_a_follower_is_sent_again_within_the_interval() {
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;
        use std::sync::atomic::{AtomicUsize, Ordering};
        // Two followers' 503s (with Connection: close), then the leader takes it.
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let handler = move || {
            let seen = seen.clone();
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::RETRY_AFTER, "1"), (header::CONNECTION, "close")],
                        "not the leader",
                    )
                        .into_response()
                } else {
                    StatusCode::NO_CONTENT.into_response()
                }
            }
        };
        let app = axum::Router::new().route(
            "/agent/v1/nodes/{node}/report",
            axum::routing::post(handler),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let temp = tempfile::tempdir().expect("tempdir");
        let syncer = Arc::new(syncer_with(temp.path(), &url, 1 << 20));
        let reporting = tokio::spawn(syncer.report_every(Duration::from_secs(10)));
        let deadline = Instant::now() + Duration::from_secs(8);
        while calls.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        reporting.abort();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "the first report is tried again until the leader takes it, not 10 s later"
        );
    }
}
