//! End to end: a real operator, a real `shoal-agent` in managed mode on a kwok
//! node's identity, real HTTP between them and real inference requests against
//! the agent. Two versions of a tiny scorer (v2 has every weight doubled, so its
//! scores differ) roll out through a step-less ModelRollout.
//!
//! Every test is bounded in time and in requests. The offline period of
//! `operator_down_agent_keeps_serving_and_restarts_from_cache` is
//! `$SHOAL_E2E_OFFLINE_SECONDS` (default 10; the acceptance criterion is 60).

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use shoal_api::agent_protocol::report_path;
use shoal_api::{EdgePool, Model, ModelRollout};
use shoal_tests::{
    Agent, KWOK_NODE_KEY, Operator, TestNamespace, client, create_kwok_node, delete_nodes,
    install_crds, pod_token, sha256_hex, tiny_onnx_model_scaled, wait_for,
};
use std::collections::BTreeMap;
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
/// The agent reports every second so the tests need not wait long for one.
const AGENT_ARGS: &[&str] = &["--report-seconds", "1"];
/// What the load clients send; v1 scores it [6, 7, 8], v2 [12, 14, 16].
const TOKENS: [i32; 4] = [1, 2, 3, 4];
const V1_SCORES: [f64; 3] = [6.0, 7.0, 8.0];
const V2_SCORES: [f64; 3] = [12.0, 14.0, 16.0];

fn v1_bytes() -> Vec<u8> {
    tiny_onnx_model_scaled(1.0)
}

fn v2_bytes() -> Vec<u8> {
    tiny_onnx_model_scaled(2.0)
}

/// One test's namespace, operator, kwok node and fleet: pool `stores` of one node,
/// Model `ranker` Ready at 1.0 (2.0's bytes wait in the same ConfigMap) and a
/// step-less rollout of 1.0 to the pool.
struct Setup {
    client: Client,
    namespace: TestNamespace,
    operator: Operator,
    node: String,
    http: reqwest::Client,
}

impl Setup {
    async fn start(prefix: &str) -> anyhow::Result<Setup> {
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
        setup.create_fleet().await?;
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

    async fn create_fleet(&self) -> anyhow::Result<()> {
        let config_map: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": CONFIG_MAP },
        }))?;
        let config_map = ConfigMap {
            binary_data: Some(BTreeMap::from([
                ("v1".to_string(), ByteString(v1_bytes())),
                ("v2".to_string(), ByteString(v2_bytes())),
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
            // These tests are about the agent: a version it refuses must stay
            // assigned (so it keeps retrying) rather than be rolled back, which
            // rollout_e2e.rs tests.
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

    /// Model `ranker` → 2.0 (the ConfigMap's `v2` key), until 2.0 is Ready. The
    /// rollout still says 1.0, so no assignment changes yet.
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

    /// A token the API server binds to the pool's DaemonSet pod on the node, as the
    /// kubelet would project it into the agent's pod.
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

    /// Starts an agent for the node against `control_plane` and waits until it
    /// serves `ranker` 1.0.
    async fn start_agent(&self, control_plane: &str) -> anyhow::Result<Agent> {
        let token = self.agent_token().await?;
        let agent = Agent::start(control_plane, &self.node, &token, AGENT_ARGS).await?;
        wait_serving(&self.http, &agent, "1.0").await?;
        Ok(agent)
    }

    /// The test passed: remove the node, stop the operator, delete the namespace.
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
    /// The HTTP status, or the transport error.
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

async fn infer(http: &reqwest::Client, agent_url: &str, body: &Value) -> Outcome {
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

fn standard_request() -> Value {
    json!({
        "inputs": [{ "name": "tokens", "datatype": "INT32", "shape": [1, 4], "data": TOKENS }],
    })
}

/// Clients sending inference requests back to back (a few ms apart) until `stop`
/// is set, `deadline` passes or `budget` requests were sent in all.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(agent_url: &str, clients: usize, deadline: Duration, budget: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let until = Instant::now() + deadline;
        let clients = (0..clients)
            .map(|_| {
                let (stop, sent) = (stop.clone(), sent.clone());
                let url = agent_url.to_string();
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .expect("an HTTP client");
                    let body = standard_request();
                    let mut outcomes = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < until
                        && sent.fetch_add(1, Ordering::Relaxed) < budget
                    {
                        outcomes.push(infer(&http, &url, &body).await);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    outcomes
                })
            })
            .collect();
        Load {
            stop,
            sent,
            clients,
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the clients; each client's outcomes, in the order it sent them.
    async fn finish(self) -> anyhow::Result<Vec<Vec<Outcome>>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for client in self.clients {
            all.push(client.await.context("a load client panicked")?);
        }
        Ok(all)
    }
}

/// Fails with the first few failures if any request was not answered 200.
fn ensure_no_failures(what: &str, outcomes: &[Vec<Outcome>]) -> anyhow::Result<usize> {
    let all: Vec<&Outcome> = outcomes.iter().flatten().collect();
    let failed: Vec<&&Outcome> = all.iter().filter(|o| !o.ok()).collect();
    ensure!(
        failed.is_empty(),
        "{what}: {} of {} requests failed, first ones: {:?}",
        failed.len(),
        all.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    Ok(all.len())
}

/// Sends `count` requests one after another and checks each is 200 from `version`.
async fn ensure_serves(agent: &Agent, version: &str, count: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    for _ in 0..count {
        let outcome = infer(&http, agent.url(), &standard_request()).await;
        ensure!(
            outcome.ok() && outcome.version() == Some(version),
            "the agent should answer from {version}: {outcome:?}"
        );
    }
    Ok(())
}

/// A forwarding proxy between the agent and the operator's agent API that keeps a
/// copy of every report body the agent POSTs: what actually goes over the wire.
struct ReportCapture {
    url: String,
    reports: Arc<Mutex<Vec<Vec<u8>>>>,
    server: tokio::task::JoinHandle<()>,
}

impl ReportCapture {
    async fn start(upstream: String, node: &str) -> anyhow::Result<ReportCapture> {
        let reports: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        // Longer than the agent's long-poll (30 s) plus the operator's answer time.
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
            async move { forward(request, &http, &upstream, &report_route, &captured).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("the test's report-capturing proxy stopped: {err}");
            }
        });
        Ok(ReportCapture {
            url,
            reports,
            server,
        })
    }

    /// Every report body captured so far, parsed.
    fn reports(&self) -> anyhow::Result<Vec<(String, Value)>> {
        let raw = self
            .reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        raw.into_iter()
            .map(|bytes| {
                let text = String::from_utf8(bytes).context("a report is not UTF-8")?;
                let value = serde_json::from_str(&text)
                    .with_context(|| format!("a report is not JSON: {text}"))?;
                Ok((text, value))
            })
            .collect()
    }

    /// Waits for a captured report in which `matches` holds for some model entry.
    async fn wait_for_model(
        &self,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reports = self.reports()?;
            if let Some(model) = reports
                .iter()
                .rev()
                .filter_map(|(_, report)| report["models"].as_array())
                .flatten()
                .find(|model| matches(model))
            {
                return Ok(model.clone());
            }
            ensure!(
                Instant::now() < deadline,
                "no report within 60 s shows {what}; the last one: {:?}",
                reports.last().map(|(text, _)| text)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ReportCapture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn forward(
    request: axum::extract::Request,
    http: &reqwest::Client,
    upstream: &str,
    report_route: &str,
    captured: &Mutex<Vec<Vec<u8>>>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 16 << 20).await {
        Ok(body) => body,
        Err(err) => return (reqwest::StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    };
    if parts.method == reqwest::Method::POST && parts.uri.path() == report_route {
        captured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(body.to_vec());
    }
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
    match answer.bytes().await {
        Ok(bytes) => (status, headers, bytes).into_response(),
        Err(err) => (reqwest::StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    }
}

#[tokio::test]
async fn swap_under_load_fails_no_request() -> anyhow::Result<()> {
    let setup = Setup::start("e2e-swap").await?;
    let agent = setup.start_agent(&setup.operator.agent_api_url()).await?;

    let load = Load::start(agent.url(), 4, Duration::from_secs(120), 6000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    setup.make_v2_ready().await?;
    setup.bump_rollout("2.0").await?;
    wait_serving(&setup.http, &agent, "2.0").await?;
    // A little more load on v2, then stop.
    let swapped_at = load.sent();
    let deadline = Instant::now() + Duration::from_secs(10);
    while load.sent() < swapped_at + 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes = load.finish().await?;
    let total = ensure_no_failures("during the swap from 1.0 to 2.0", &outcomes)?;
    for (client, outcomes) in outcomes.iter().enumerate() {
        let versions: Vec<Option<&str>> = outcomes.iter().map(Outcome::version).collect();
        ensure!(
            versions.iter().all(Option::is_some),
            "client {client}: every answer is v1's or v2's, with scores matching its version: {:?}",
            outcomes.iter().find(|o| o.version().is_none())
        );
        let first_v2 = versions
            .iter()
            .position(|v| *v == Some("2.0"))
            .with_context(|| format!("client {client} never got an answer from 2.0"))?;
        ensure!(
            first_v2 > 0,
            "client {client} should start on 1.0: {versions:?}"
        );
        ensure!(
            versions[first_v2..].iter().all(|v| *v == Some("2.0")),
            "client {client}: once 2.0 answered, 1.0 never answers again: {versions:?}"
        );
    }
    eprintln!("swap under load: {total} requests, all 200");
    ensure!(
        served_versions(&setup.http, &agent).await == Some(vec!["2.0".to_string()]),
        "the metadata lists 2.0 only"
    );
    // The agent's own counters saw no error either.
    let metrics = setup
        .http
        .get(format!("{}/metrics", agent.url()))
        .send()
        .await?
        .text()
        .await?;
    for line in metrics.lines().filter(|line| {
        line.starts_with("shoal_agent_requests_total") && line.contains("model=\"ranker\"")
    }) {
        ensure!(
            line.contains("code=\"200\""),
            "the agent counted a non-200 answer: {line}"
        );
    }

    agent.stop().await?;
    setup.finish().await
}

#[tokio::test]
async fn corrupt_artifact_is_refused_and_v1_keeps_serving() -> anyhow::Result<()> {
    let setup = Setup::start("e2e-corrupt").await?;
    let capture = ReportCapture::start(setup.operator.agent_api_url(), &setup.node).await?;
    let agent = setup.start_agent(&capture.url).await?;
    ensure_serves(&agent, "1.0", 5).await?;

    setup.make_v2_ready().await?;
    // The operator verified 2.0 when it stored it; now its blob rots on disk: same
    // length, other bytes, so what the agent downloads does not match the digest.
    let v2 = v2_bytes();
    let v2_hex = sha256_hex(&v2);
    let blob = setup.operator.artifact_dir().join("sha256").join(&v2_hex);
    ensure!(
        blob.is_file(),
        "the operator stored 2.0 at {}",
        blob.display()
    );
    let corrupt: Vec<u8> = v2.iter().map(|byte| byte ^ 0x5a).collect();
    let replacement = blob.with_extension("corrupt");
    std::fs::write(&replacement, &corrupt)?;
    std::fs::rename(&replacement, &blob)?;
    ensure!(std::fs::read(&blob)? == corrupt);

    let load = Load::start(agent.url(), 1, Duration::from_secs(90), 3000);
    setup.bump_rollout("2.0").await?;
    let failed = capture
        .wait_for_model("ranker 2.0 Failed with the digest error", |model| {
            model["name"] == MODEL && model["version"] == "2.0" && model["state"] == "Failed"
        })
        .await?;
    let error = failed["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains(&v2_hex) && error.contains("sha256"),
        "the report says why 2.0 failed, naming the expected digest: {failed}"
    );
    // Let a few more retries of the download fail while requests keep coming.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes = load.finish().await?;
    let total = ensure_no_failures("while 2.0 was refused", &outcomes)?;
    ensure!(
        outcomes
            .iter()
            .flatten()
            .all(|o| o.version() == Some("1.0")),
        "every answer came from 1.0: {:?}",
        outcomes
            .iter()
            .flatten()
            .find(|o| o.version() != Some("1.0"))
    );
    eprintln!("corrupt artifact: {total} requests, all 200 from 1.0");
    ensure!(
        served_versions(&setup.http, &agent).await == Some(vec!["1.0".to_string()]),
        "the metadata still lists 1.0 only"
    );
    // The latest report still has 1.0 Serving beside 2.0 Failed.
    capture
        .wait_for_model("ranker 1.0 Serving", |model| {
            model["name"] == MODEL && model["version"] == "1.0" && model["state"] == "Serving"
        })
        .await?;
    // Nothing of the corrupt download stays in the agent's cache.
    let cached = agent
        .cache_dir()
        .join("artifacts")
        .join("sha256")
        .join(&v2_hex);
    ensure!(!cached.exists(), "{} should not exist", cached.display());
    let leftovers: Vec<_> = std::fs::read_dir(agent.cache_dir().join("tmp"))?
        .flatten()
        .map(|entry| entry.file_name())
        .filter(|name| name.to_string_lossy().contains(&v2_hex))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "the corrupt download was discarded: {leftovers:?}"
    );
    ensure!(
        agent.logs().contains("download failed"),
        "the agent logs the refused download"
    );

    // The blob is repaired: the agent, still retrying the same assignment, takes 2.0.
    std::fs::write(&replacement, &v2)?;
    std::fs::rename(&replacement, &blob)?;
    wait_serving(&setup.http, &agent, "2.0").await?;
    ensure_serves(&agent, "2.0", 5).await?;
    capture
        .wait_for_model("ranker 2.0 Serving", |model| {
            model["name"] == MODEL && model["version"] == "2.0" && model["state"] == "Serving"
        })
        .await?;

    agent.stop().await?;
    drop(capture);
    setup.finish().await
}

#[tokio::test]
async fn operator_down_agent_keeps_serving_and_restarts_from_cache() -> anyhow::Result<()> {
    let offline = std::env::var("SHOAL_E2E_OFFLINE_SECONDS")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>())
        .transpose()
        .context("SHOAL_E2E_OFFLINE_SECONDS must be a whole number of seconds")?
        .unwrap_or(10);
    let mut setup = Setup::start("e2e-offline").await?;
    let mut agent = setup.start_agent(&setup.operator.agent_api_url()).await?;
    // The last-known-good assignment is on disk once 1.0 serves completely.
    let last_known_good = agent.cache_dir().join("last-known-good.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !last_known_good.is_file() {
        ensure!(
            Instant::now() < deadline,
            "{} was never written",
            last_known_good.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    setup.operator.kill().await?;
    let offline_for = Duration::from_secs(offline);
    let load = Load::start(agent.url(), 1, offline_for, 100 * offline as usize + 100);
    tokio::time::sleep(offline_for).await;
    let outcomes = load.finish().await?;
    let total = ensure_no_failures("while the operator was down", &outcomes)?;
    ensure!(
        outcomes
            .iter()
            .flatten()
            .all(|o| o.version() == Some("1.0")),
        "every answer came from 1.0"
    );
    eprintln!("operator down for {offline} s: {total} requests, all 200");

    // The agent restarts while the control plane is still unreachable: it serves
    // 1.0 from its cache as soon as it listens.
    agent.restart().await?;
    ensure!(
        served_versions(&setup.http, &agent).await == Some(vec!["1.0".to_string()]),
        "the restarted agent serves 1.0 from its cache at once"
    );
    ensure_serves(&agent, "1.0", 20).await?;
    ensure!(
        agent
            .logs()
            .contains("serving the last-known-good assignment from the cache"),
        "the agent says it served from its cache"
    );

    // The operator comes back on the same address: the agent's next report reaches
    // it. The operator takes that first report of an agent older than itself as the
    // baseline of its counters; requests after it count in the fleet totals. (The
    // restarted operator's own /metrics, not the EdgePool's status, proves a fresh
    // report: reports do not trigger a pool reconcile, its status is rewritten on a
    // 60 s resync, and until then it may still show what the old operator wrote.)
    setup.operator.restart().await?;
    let ns = setup.ns().to_string();
    let connected =
        format!("shoal_fleet_agents{{namespace=\"{ns}\",pool=\"{POOL}\",state=\"connected\"}} 1");
    wait_for_metric(&setup.operator, &agent, |line| line == connected).await?;
    ensure_serves(&agent, "1.0", 5).await?;
    let requests = format!(
        "shoal_fleet_requests_total{{namespace=\"{ns}\",model=\"{MODEL}\",version=\"1.0\",pool=\"{POOL}\"}} 5"
    );
    wait_for_metric(&setup.operator, &agent, |line| line == requests).await?;

    agent.stop().await?;
    setup.finish().await
}

/// Polls the operator's /metrics until a line satisfies `matches`.
async fn wait_for_metric(
    operator: &Operator,
    agent: &Agent,
    matches: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = operator.metrics().await?;
        if text.lines().any(&matches) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the operator's /metrics did not show what the test waits for within 60 s:\n{text}\nthe agent's log:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn reports_carry_no_request_payloads() -> anyhow::Result<()> {
    let setup = Setup::start("e2e-privacy").await?;
    let capture = ReportCapture::start(setup.operator.agent_api_url(), &setup.node).await?;
    let agent = setup.start_agent(&capture.url).await?;

    // Values no counter, histogram or timestamp would contain by chance.
    let secret_id = format!("secret-id-{}", shoal_tests::unique_name("req"));
    let secret_value: i32 = 987_654_321;
    let request = json!({
        "id": secret_id,
        "inputs": [{ "name": "tokens", "datatype": "INT32", "shape": [1, 4], "data": [secret_value, 7, 11, 13] }],
    });
    let response = setup
        .http
        .post(format!("{}/v2/models/{MODEL}/infer", agent.url()))
        .header("content-type", "application/json")
        .body(request.to_string())
        .send()
        .await?;
    ensure!(response.status() == 200, "{}", response.status());
    let answer: Value = serde_json::from_slice(&response.bytes().await?)?;
    ensure!(
        answer["id"] == secret_id.as_str(),
        "the id is echoed: {answer}"
    );
    let outputs: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .context("scores")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    ensure!(outputs.len() == 3, "{answer}");

    // Wait for a report that counts the request, then look at everything sent.
    capture
        .wait_for_model("the request counted", |model| {
            model["name"] == MODEL && model["requests"].as_u64().is_some_and(|n| n >= 1)
        })
        .await?;
    let reports = capture.reports()?;
    ensure!(!reports.is_empty());
    let secret_text = secret_value.to_string();
    for (text, report) in &reports {
        ensure!(
            !text.contains(&secret_id) && !text.contains("secret-id"),
            "a report carries the request id: {text}"
        );
        ensure!(
            !text.contains(&secret_text),
            "a report carries the input value: {text}"
        );
        ensure!(
            !text.contains("tokens") && !text.contains("scores"),
            "a report names the request's tensors: {text}"
        );
        let mut numbers = Vec::new();
        collect_numbers(report, &mut numbers);
        for number in numbers {
            ensure!(
                number != f64::from(secret_value)
                    && !outputs
                        .iter()
                        .any(|o| (o - number).abs() < 1e-6 * o.abs().max(1.0)),
                "a report carries a request's input or output value {number}: {text}"
            );
        }
        // Only the protocol's aggregate fields.
        let keys: Vec<&str> = report
            .as_object()
            .context("a report is an object")?
            .keys()
            .map(String::as_str)
            .collect();
        for key in keys {
            ensure!(
                ["node", "agentStartTime", "agentVersion", "models"].contains(&key),
                "unexpected report field {key}: {text}"
            );
        }
        for model in report["models"].as_array().into_iter().flatten() {
            for key in model.as_object().context("a model report")?.keys() {
                ensure!(
                    [
                        "name",
                        "version",
                        "state",
                        "error",
                        "requests",
                        "errors",
                        "latencyBuckets",
                        "latencySumMs"
                    ]
                    .contains(&key.as_str()),
                    "unexpected model report field {key}: {text}"
                );
            }
        }
    }
    eprintln!(
        "{} reports checked, none carries request data",
        reports.len()
    );

    agent.stop().await?;
    drop(capture);
    setup.finish().await
}

fn collect_numbers(value: &Value, out: &mut Vec<f64>) {
    match value {
        Value::Number(number) => out.extend(number.as_f64()),
        Value::Array(items) => items.iter().for_each(|item| collect_numbers(item, out)),
        Value::Object(fields) => fields.values().for_each(|item| collect_numbers(item, out)),
        _ => {}
    }
}
