//! Fault injection at the edge, with a real operator, a real managed-mode
//! `shoal-agent` on a kwok node's identity and real inference requests:
//!
//! - the agent's cache has no room for the next version: the download fails
//!   cleanly, the old version keeps serving every request, the report carries
//!   the error and nothing partial stays in the cache;
//! - the agent is SIGKILLed, several times, while it swaps to a new version
//!   (mostly in the middle of the download, which a relay between agent and
//!   operator slows down): after each restart it serves a complete version at
//!   once, never a half-written file, and it converges to the new version.
//!
//! Every test is bounded in time and in requests; measured figures go to stderr.

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use shoal_api::agent_protocol::{self, report_path};
use shoal_api::{EdgePool, Model, ModelRollout};
use shoal_tests::{
    Agent, KWOK_NODE_KEY, Operator, TestNamespace, client, create_kwok_node, delete_nodes,
    install_crds, pod_token, sha256_hex, tiny_onnx_model_padded, tiny_onnx_model_scaled, wait_for,
};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(90);
const POOL_LABEL: &str = "shoal.dev/test-pool";
const POOL: &str = "stores";
const AGENT_ACCOUNT: &str = "shoal-agent-stores";
const MODEL: &str = "ranker";
const ROLLOUT: &str = "ranker-rollout";
const CONFIG_MAP: &str = "ranker-onnx";
const AUDIENCE: &str = "shoal";
/// What the load clients send; v1 scores it [6, 7, 8], v2 [12, 14, 16].
const TOKENS: [i32; 4] = [1, 2, 3, 4];
const V1_SCORES: [f64; 3] = [6.0, 7.0, 8.0];
const V2_SCORES: [f64; 3] = [12.0, 14.0, 16.0];

fn v1_bytes() -> Vec<u8> {
    tiny_onnx_model_scaled(1.0)
}

/// One test's namespace, operator, kwok node and fleet: pool `stores` of one node,
/// Model `ranker` Ready at 1.0 (`v2`'s bytes wait in the same ConfigMap) and a
/// step-less rollout of 1.0 to the pool without automatic rollback.
struct Setup {
    client: Client,
    namespace: TestNamespace,
    operator: Operator,
    node: String,
    http: reqwest::Client,
}

impl Setup {
    async fn start(prefix: &str, v2: &[u8]) -> anyhow::Result<Setup> {
        let client = client().await?;
        install_crds(&client).await?;
        let namespace = TestNamespace::create(&client, prefix).await?;
        let ns = namespace.name().to_string();
        let operator = Operator::start(&ns).await?;
        let node = format!("{ns}-edge");
        create_kwok_node(&client, &node, &[(POOL_LABEL, ns.as_str())]).await?;
        let setup = Setup {
            client,
            namespace,
            operator,
            node,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        setup.create_fleet(v2).await?;
        Ok(setup)
    }

    fn ns(&self) -> &str {
        self.namespace.name()
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), self.ns())
    }

    async fn create_fleet(&self, v2: &[u8]) -> anyhow::Result<()> {
        let config_map: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": CONFIG_MAP },
        }))?;
        let config_map = ConfigMap {
            binary_data: Some(BTreeMap::from([
                ("v1".to_string(), ByteString(v1_bytes())),
                ("v2".to_string(), ByteString(v2.to_vec())),
            ])),
            ..config_map
        };
        self.api::<ConfigMap>()
            .create(&PostParams::default(), &config_map)
            .await?;
        let model: Model = serde_json::from_value(json!({
            "apiVersion": "shoal.dev/v1alpha1", "kind": "Model",
            "metadata": { "name": MODEL },
            "spec": { "version": "1.0", "source": { "configMap": { "name": CONFIG_MAP, "key": "v1" } } },
        }))?;
        self.api::<Model>()
            .create(&PostParams::default(), &model)
            .await?;
        let pool: EdgePool = serde_json::from_value(json!({
            "apiVersion": "shoal.dev/v1alpha1", "kind": "EdgePool",
            "metadata": { "name": POOL },
            "spec": {
                "nodeSelector": { "matchLabels": { POOL_LABEL: self.ns() } },
                "tolerations": [{ "key": KWOK_NODE_KEY, "operator": "Exists", "effect": "NoSchedule" }],
            },
        }))?;
        self.api::<EdgePool>()
            .create(&PostParams::default(), &pool)
            .await?;
        let rollout: ModelRollout = serde_json::from_value(json!({
            "apiVersion": "shoal.dev/v1alpha1", "kind": "ModelRollout",
            "metadata": { "name": ROLLOUT },
            // A version the agent cannot take must stay assigned, not be rolled back.
            "spec": { "model": MODEL, "version": "1.0", "pools": [POOL], "autoRollback": false },
        }))?;
        self.api::<ModelRollout>()
            .create(&PostParams::default(), &rollout)
            .await?;
        self.wait_model_version("1.0").await
    }

    async fn wait_model_version(&self, version: &str) -> anyhow::Result<()> {
        wait_for(&self.api::<Model>(), MODEL, WAIT, |model| {
            model
                .status
                .as_ref()
                .is_some_and(|s| s.versions.iter().any(|v| v.version == version))
        })
        .await
        .with_context(|| format!("Model {MODEL} version {version} should become Ready"))?;
        Ok(())
    }

    /// Model `ranker` → 2.0 (the ConfigMap's `v2` key), until 2.0 is Ready.
    async fn make_v2_ready(&self) -> anyhow::Result<()> {
        let new_version = json!({ "spec": { "version": "2.0", "source": { "configMap": { "name": CONFIG_MAP, "key": "v2" } } } });
        self.api::<Model>()
            .patch(MODEL, &PatchParams::default(), &Patch::Merge(&new_version))
            .await?;
        self.wait_model_version("2.0").await
    }

    async fn bump_rollout(&self, version: &str) -> anyhow::Result<()> {
        self.api::<ModelRollout>()
            .patch(
                ROLLOUT,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": { "version": version } })),
            )
            .await?;
        Ok(())
    }

    /// A token the API server binds to the pool's DaemonSet pod on the node.
    async fn agent_token(&self) -> anyhow::Result<String> {
        let pods = self.api::<Pod>();
        let deadline = Instant::now() + WAIT;
        let pod = loop {
            let listed = pods
                .list(&ListParams::default().labels(&format!("shoal.dev/pool={POOL}")))
                .await?;
            let on_node = listed.items.into_iter().find(|pod| {
                pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.node.as_str())
            });
            if let Some(name) = on_node.and_then(|pod| pod.metadata.name) {
                break name;
            }
            ensure!(
                Instant::now() < deadline,
                "the DaemonSet {AGENT_ACCOUNT} put no agent pod on node {} within {WAIT:?}",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        pod_token(&self.client, self.ns(), AGENT_ACCOUNT, &pod, AUDIENCE).await
    }

    /// Starts an agent for the node against `control_plane` with `extra_args` and
    /// waits until it serves `ranker` 1.0.
    async fn start_agent(&self, control_plane: &str, extra_args: &[&str]) -> anyhow::Result<Agent> {
        let token = self.agent_token().await?;
        let mut args = vec!["--report-seconds", "1"];
        args.extend_from_slice(extra_args);
        let agent = Agent::start(control_plane, &self.node, &token, &args).await?;
        wait_serving(&self.http, &agent, "1.0").await?;
        Ok(agent)
    }

    async fn finish(self) -> anyhow::Result<()> {
        delete_nodes(&self.client, std::slice::from_ref(&self.node)).await?;
        self.operator.stop().await?;
        self.namespace.delete().await
    }
}

/// `GET /v2/models/ranker` → its `versions`, or None if the model is not served.
async fn served_versions(http: &reqwest::Client, agent: &Agent) -> Option<Vec<String>> {
    let response = http
        .get(format!("{}/v2/models/{MODEL}", agent.url()))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: Value = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
    body["versions"].as_array().map(|versions| {
        versions
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    })
}

/// Waits until the agent's metadata for `ranker` lists exactly `version`.
async fn wait_serving(http: &reqwest::Client, agent: &Agent, version: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let versions = served_versions(http, agent).await;
        if versions.as_deref() == Some(&[version.to_string()][..]) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent should serve {MODEL} {version} within {WAIT:?}; its metadata lists {versions:?}; its log:\n{}",
                agent.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The answer to one inference request.
#[derive(Debug, Clone)]
struct Outcome {
    status: Result<u16, String>,
    model_version: Option<String>,
    scores: Vec<f64>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status == Ok(200)
    }

    /// "1.0" or "2.0" when the version and the scores agree on it.
    fn version(&self) -> Option<&'static str> {
        let close = |expected: &[f64; 3]| {
            self.scores.len() == 3
                && self
                    .scores
                    .iter()
                    .zip(expected)
                    .all(|(a, b)| (a - b).abs() < 1e-3)
        };
        match self.model_version.as_deref() {
            Some("1.0") if close(&V1_SCORES) => Some("1.0"),
            Some("2.0") if close(&V2_SCORES) => Some("2.0"),
            _ => None,
        }
    }
}

async fn infer(http: &reqwest::Client, agent_url: &str) -> Outcome {
    let body = json!({
        "inputs": [{ "name": "tokens", "datatype": "INT32", "shape": [1, 4], "data": TOKENS }],
    });
    let response = http
        .post(format!("{agent_url}/v2/models/{MODEL}/infer"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(err) => {
            return Outcome {
                status: Err(err.to_string()),
                model_version: None,
                scores: Vec::new(),
            };
        }
    };
    let status = response.status().as_u16();
    let body: Value = match response.bytes().await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        Err(err) => {
            return Outcome {
                status: Err(format!("HTTP {status}, body unreadable: {err}")),
                model_version: None,
                scores: Vec::new(),
            };
        }
    };
    Outcome {
        status: Ok(status),
        model_version: body["model_version"].as_str().map(str::to_string),
        scores: body["outputs"][0]["data"]
            .as_array()
            .map(|data| data.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
    }
}

/// One client sending inference requests 20 ms apart until stopped, `deadline`
/// passes or `budget` requests were sent.
struct Load {
    stop: Arc<AtomicBool>,
    client: tokio::task::JoinHandle<Vec<Outcome>>,
}

impl Load {
    fn start(agent_url: &str, deadline: Duration, budget: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let until = Instant::now() + deadline;
        let url = agent_url.to_string();
        let flag = stop.clone();
        let client = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client");
            let mut outcomes = Vec::new();
            while !flag.load(Ordering::Relaxed)
                && Instant::now() < until
                && sent.fetch_add(1, Ordering::Relaxed) < budget
            {
                outcomes.push(infer(&http, &url).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcomes
        });
        Load { stop, client }
    }

    async fn finish(self) -> anyhow::Result<Vec<Outcome>> {
        self.stop.store(true, Ordering::Relaxed);
        self.client.await.context("the load client panicked")
    }
}

/// Sends `count` requests one after another and checks each is 200 from `version`.
async fn ensure_serves(agent: &Agent, version: &str, count: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    for _ in 0..count {
        let outcome = infer(&http, agent.url()).await;
        ensure!(
            outcome.ok() && outcome.version() == Some(version),
            "the agent should answer from {version}: {outcome:?}"
        );
    }
    Ok(())
}

/// A relay between the agent and the operator's agent API: keeps a copy of every
/// report the agent POSTs and, when `throttle` is set, streams artifact downloads
/// 16 KiB at a time with a pause between pieces, like a slow WAN link.
struct Relay {
    url: String,
    reports: Arc<Mutex<Vec<Value>>>,
    server: tokio::task::JoinHandle<()>,
}

const THROTTLE_PIECE: usize = 16 * 1024;
const THROTTLE_PAUSE: Duration = Duration::from_millis(50);

impl Relay {
    async fn start(upstream: String, node: &str, throttle: bool) -> anyhow::Result<Relay> {
        let reports: Arc<Mutex<Vec<Value>>> = Arc::default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let report_route = report_path(node);
        let captured = reports.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let (http, upstream, report_route, captured) = (
                http.clone(),
                upstream.clone(),
                report_route.clone(),
                captured.clone(),
            );
            async move {
                relay(
                    request,
                    &http,
                    &upstream,
                    &report_route,
                    &captured,
                    throttle,
                )
                .await
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("the test's relay stopped: {err}");
            }
        });
        Ok(Relay {
            url,
            reports,
            server,
        })
    }

    /// Waits for a captured report in which `matches` holds for some model entry.
    async fn wait_for_model(
        &self,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reports = self
                .reports
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if let Some(model) = reports
                .iter()
                .rev()
                .filter_map(|report| report["models"].as_array())
                .flatten()
                .find(|model| matches(model))
            {
                return Ok(model.clone());
            }
            ensure!(
                Instant::now() < deadline,
                "no report within 60 s shows {what}; the last one: {:?}",
                reports.last()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn relay(
    request: axum::extract::Request,
    http: &reqwest::Client,
    upstream: &str,
    report_route: &str,
    captured: &Mutex<Vec<Value>>,
    throttle: bool,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use futures::StreamExt as _;
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 16 << 20).await {
        Ok(body) => body,
        Err(err) => return (reqwest::StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    };
    if parts.method == reqwest::Method::POST
        && parts.uri.path() == report_route
        && let Ok(report) = serde_json::from_slice(&body)
    {
        captured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(report);
    }
    let is_download = parts
        .uri
        .path()
        .starts_with(&agent_protocol::artifact_path(""));
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let mut headers = parts.headers.clone();
    for hop in ["host", "content-length", "connection", "transfer-encoding"] {
        headers.remove(hop);
    }
    let answer = http
        .request(parts.method.clone(), format!("{upstream}{path}"))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(err) => return (reqwest::StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    };
    let status = answer.status();
    let mut headers = answer.headers().clone();
    for hop in ["content-length", "connection", "transfer-encoding"] {
        headers.remove(hop);
    }
    let bytes = match answer.bytes().await {
        Ok(bytes) => bytes,
        Err(err) => return (reqwest::StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    };
    if !(throttle && is_download) {
        return (status, headers, bytes).into_response();
    }
    let pieces: Vec<axum::body::Bytes> = bytes
        .chunks(THROTTLE_PIECE)
        .map(|piece| bytes.slice_ref(piece))
        .collect();
    let slow = futures::stream::iter(pieces).then(|piece| async move {
        tokio::time::sleep(THROTTLE_PAUSE).await;
        Ok::<_, std::io::Error>(piece)
    });
    (status, headers, axum::body::Body::from_stream(slow)).into_response()
}

/// The names of the files in `dir`, or none if it does not exist.
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn cache_full_fails_the_download_cleanly_and_v1_keeps_serving() -> anyhow::Result<()> {
    let v1 = v1_bytes();
    let v2 = tiny_onnx_model_scaled(2.0);
    let v2_hex = sha256_hex(&v2);
    let setup = Setup::start("faults-cache-full", &v2).await?;
    let relay = Relay::start(setup.operator.agent_api_url(), &setup.node, false).await?;
    // Room for 1.0 and a few bytes more: 2.0 (as big as 1.0) cannot fit beside it.
    let cache_size = (v1.len() + 16).to_string();
    let agent = setup
        .start_agent(&relay.url, &["--cache-size", cache_size.as_str()])
        .await?;
    ensure_serves(&agent, "1.0", 5).await?;

    setup.make_v2_ready().await?;
    let load = Load::start(agent.url(), Duration::from_secs(90), 3000);
    setup.bump_rollout("2.0").await?;
    let failed = relay
        .wait_for_model("ranker 2.0 Failed with the cache error", |model| {
            model["name"] == MODEL && model["version"] == "2.0" && model["state"] == "Failed"
        })
        .await?;
    let error = failed["error"].as_str().unwrap_or_default();
    eprintln!("cache full: the agent reports 2.0 Failed: {error}");
    ensure!(
        error.contains("no room") && error.contains("cacheSize"),
        "the report says the cache is too small and what to raise: {failed}"
    );
    // A few more retries fail while requests keep coming.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes = load.finish().await?;
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed while 2.0 did not fit, first ones: {:?}",
        failures.len(),
        outcomes.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    ensure!(
        outcomes.iter().all(|o| o.version() == Some("1.0")),
        "every answer came from 1.0: {:?}",
        outcomes.iter().find(|o| o.version() != Some("1.0"))
    );
    eprintln!(
        "cache full: {} requests while 2.0 was refused, all 200 from 1.0",
        outcomes.len()
    );
    ensure!(
        served_versions(&setup.http, &agent).await == Some(vec!["1.0".to_string()]),
        "the metadata still lists 1.0 only"
    );
    relay
        .wait_for_model("ranker 1.0 Serving", |model| {
            model["name"] == MODEL && model["version"] == "1.0" && model["state"] == "Serving"
        })
        .await?;
    // Nothing of 2.0 is in the cache, complete or partial; 1.0 still is.
    let cache = agent.cache_dir();
    let artifacts = files_in(&cache.join("artifacts").join("sha256"));
    ensure!(
        artifacts == vec![sha256_hex(&v1)],
        "the cache holds 1.0's artifact only: {artifacts:?}"
    );
    let temp = files_in(&cache.join("tmp"));
    ensure!(
        temp.iter().all(|name| !name.contains(&v2_hex)),
        "no partial download of 2.0 stays: {temp:?}"
    );
    ensure!(
        agent.logs().contains("download failed"),
        "the agent logs the refused download"
    );

    agent.stop().await?;
    drop(relay);
    setup.finish().await
}

/// A pseudo-random duration in `[0, max)`, different on every call.
fn random_delay(max: Duration) -> Duration {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let fraction = (hasher.finish() % 10_000) as f64 / 10_000.0;
    max.mul_f64(fraction)
}

/// What an agent's cache holds for one artifact: the verified file (checked
/// against its digest, never half-written) and the size of a download in progress.
fn inspect_cache(cache: &Path, hex: &str, full_len: usize) -> anyhow::Result<(bool, u64)> {
    let artifact = cache.join("artifacts").join("sha256").join(hex);
    let complete = match std::fs::read(&artifact) {
        Ok(bytes) => {
            ensure!(
                sha256_hex(&bytes) == hex && bytes.len() == full_len,
                "{} is in place but is not the complete artifact ({} of {full_len} bytes)",
                artifact.display(),
                bytes.len()
            );
            true
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => return Err(err).context("reading the cached artifact"),
    };
    let partial = cache.join("tmp").join(format!("{hex}.partial"));
    let partial_len = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    ensure!(
        partial_len <= full_len as u64,
        "the partial download is longer ({partial_len}) than the artifact ({full_len})"
    );
    Ok((complete, partial_len))
}

#[tokio::test]
async fn agent_killed_during_a_swap_restarts_on_a_complete_version() -> anyhow::Result<()> {
    // 600 KB: a ConfigMap holds it, and through the relay (16 KiB per 50 ms) its
    // download takes about 2 s, a window a kill lands in.
    let v2 = tiny_onnx_model_padded(2.0, 600_000);
    let v2_hex = sha256_hex(&v2);
    let setup = Setup::start("faults-kill-swap", &v2).await?;
    let relay = Relay::start(setup.operator.agent_api_url(), &setup.node, true).await?;
    let mut agent = setup.start_agent(&relay.url, &[]).await?;
    ensure_serves(&agent, "1.0", 5).await?;
    let cache = agent.cache_dir();
    let last_known_good = cache.join("last-known-good.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !last_known_good.is_file() {
        ensure!(
            Instant::now() < deadline,
            "1.0 never became last-known-good"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    setup.make_v2_ready().await?;
    setup.bump_rollout("2.0").await?;
    // Wait until the download of 2.0 starts.
    let partial = cache.join("tmp").join(format!("{v2_hex}.partial"));
    let artifact = cache.join("artifacts").join("sha256").join(&v2_hex);
    let deadline = Instant::now() + WAIT;
    while !partial.exists() && !artifact.exists() {
        ensure!(
            Instant::now() < deadline,
            "the agent never started downloading 2.0; its log:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    const KILLS: usize = 4;
    let mut resumable_kills = 0;
    for round in 1..=KILLS {
        // The whole download takes about 2 s through the relay: most kills land
        // in the middle of it; later ones may land in the load or after the
        // swap, which must be as safe.
        let delay = random_delay(Duration::from_millis(700));
        tokio::time::sleep(delay).await;
        agent.kill().await?;
        let (complete, partial_len) = inspect_cache(&cache, &v2_hex, v2.len())?;
        if partial_len > 0 && !complete {
            resumable_kills += 1;
        }
        let started = Instant::now();
        agent.restart().await?;
        let listening_after = started.elapsed();
        // At once: a complete version answers metadata and inference.
        let versions = served_versions(&setup.http, &agent)
            .await
            .context("the restarted agent serves ranker at once")?;
        let version = match versions.as_slice() {
            [version] if version == "1.0" || version == "2.0" => version.clone(),
            _ => bail!("the restarted agent lists {versions:?}"),
        };
        let outcome = infer(&setup.http, agent.url()).await;
        ensure!(
            outcome.ok() && outcome.version().is_some(),
            "round {round}: the restarted agent answers from a complete version: {outcome:?}"
        );
        eprintln!(
            "kill {round}: {} ms after the download started/resumed: 2.0 {} in the cache, \
             {partial_len} of {} bytes downloaded; restarted in {listening_after:.1?} serving {version}",
            delay.as_millis(),
            if complete { "complete" } else { "not" },
            v2.len()
        );
        if round < KILLS {
            // Let the restarted agent get back to the download (or past it).
            let deadline = Instant::now() + WAIT;
            loop {
                let (complete, len) = inspect_cache(&cache, &v2_hex, v2.len())?;
                if complete || len != partial_len {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "round {round}: the restarted agent did not resume the download; its log:\n{}",
                    agent.logs()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    // Left alone, it converges to 2.0, from a verified artifact.
    wait_serving(&setup.http, &agent, "2.0").await?;
    ensure_serves(&agent, "2.0", 10).await?;
    let (complete, _) = inspect_cache(&cache, &v2_hex, v2.len())?;
    ensure!(complete, "2.0's verified artifact is in the cache");
    let deadline = Instant::now() + Duration::from_secs(30);
    while partial.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} stays after 2.0 serves",
            partial.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resumed = agent.logs().matches("resuming download").count();
    eprintln!(
        "killed {KILLS} times during the swap ({resumable_kills} with a partial download); \
         {resumed} resumed downloads; converged to 2.0"
    );
    ensure!(
        resumable_kills == 0 || resumed > 0,
        "a partial download was left {resumable_kills} times but never resumed"
    );
    relay
        .wait_for_model("ranker 2.0 Serving", |model| {
            model["name"] == MODEL && model["version"] == "2.0" && model["state"] == "Serving"
        })
        .await?;

    agent.stop().await?;
    drop(relay);
    setup.finish().await
}
