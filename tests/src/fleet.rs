//! The fleet of the end-to-end tests (`agent_api.rs`, `agent_e2e.rs`, `faults.rs`,
//! `rollout_e2e.rs`): one test namespace with its own operator, kwok nodes in one or
//! more EdgePools, Model `ranker` from ConfigMap `ranker-onnx` Ready at 1.0 and
//! ModelRollout `ranker-rollout` of 1.0 to every pool. Also what those tests do with
//! the `shoal-agent` processes on the nodes' identities: start them with pod-bound
//! tokens, ask which versions they serve, send them inference requests (one at a
//! time or as a steady load) and relay their reports to the operator.

use crate::agent_process::Agent;
use crate::cluster::{TestNamespace, client, install_crds};
use crate::credentials::pod_token;
use crate::kwok_nodes::{create_kwok_node, delete_nodes};
use crate::model_objects::{
    self, create_config_map, create_edge_pool, create_model, create_rollout,
};
use crate::operator_process::Operator;
use crate::wait::wait_for;
use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::{Value, json};
use shoal_api::agent_protocol::{artifact_path, report_path};
use shoal_api::{EdgePool, Model, ModelRollout, ModelRolloutStatus};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the fleet's helpers wait for the cluster and the agents: a Model version
/// to become Ready, a rollout to reach a state, an agent pod to be scheduled, an agent
/// to serve a version.
pub const WAIT: Duration = Duration::from_secs(90);
/// The Model every fleet serves.
pub const MODEL: &str = "ranker";
/// The ModelRollout of [`MODEL`] to every pool of the fleet.
pub const ROLLOUT: &str = "ranker-rollout";
/// The ConfigMap that holds the model's ONNX files, one key a version.
pub const CONFIG_MAP: &str = "ranker-onnx";
/// The audience of the agents' tokens, the one the operator's agent API accepts.
pub const AUDIENCE: &str = "shoal";
/// Label on every node of a fleet, with the test's namespace as value, so that a
/// test's pools select its own nodes only.
pub const TEST_LABEL: &str = "shoal.dev/test-pool";
/// Label with the pool a node belongs to, within its fleet.
pub const SITE_LABEL: &str = "shoal.dev/test-site";
/// What inference requests send: 1.0 (`tiny_onnx_model_scaled(1.0)`) scores it
/// [`V1_SCORES`], 2.0 (`tiny_onnx_model_scaled(2.0)`) [`V2_SCORES`].
pub const TOKENS: [i32; 4] = [1, 2, 3, 4];
/// What version 1.0 answers for [`TOKENS`].
pub const V1_SCORES: [f64; 3] = [6.0, 7.0, 8.0];
/// What version 2.0 answers for [`TOKENS`].
pub const V2_SCORES: [f64; 3] = [12.0, 14.0, 16.0];
/// Flags of every agent the fleet starts: it reports every second, so the tests need
/// not wait long for a report.
const AGENT_ARGS: &[&str] = &["--report-seconds", "1"];

/// What [`Fleet::start`] makes.
pub struct FleetSpec<'a> {
    /// The test's namespace is `<prefix>-<random suffix>`.
    pub prefix: &'a str,
    /// More flags for `shoal-operator run`, such as `--agent-stale-after 10s`.
    pub operator_args: &'a [&'a str],
    /// The EdgePools and how many kwok nodes each has. Node `i` of pool `p` is
    /// `<namespace>-<p>-<i>`, and the DaemonSet of pool `p` runs its agent pods as
    /// ServiceAccount `shoal-agent-<p>`.
    pub pools: &'a [(&'a str, usize)],
    /// The keys of ConfigMap [`CONFIG_MAP`] and the ONNX bytes under each. Model
    /// [`MODEL`] starts at version 1.0 from key `v1`; the other keys wait for
    /// [`Fleet::make_version_ready`].
    pub model_files: Vec<(&'a str, Vec<u8>)>,
    /// `spec.autoRollback` of [`ROLLOUT`] (true is the CRD's default). The agent
    /// tests set it to false: a version an agent refuses must stay assigned, so that
    /// the agent keeps retrying, rather than be rolled back.
    pub auto_rollback: bool,
    /// The timeout of every request made with [`Fleet::http`].
    pub http_timeout: Duration,
    /// The operator's kubeconfig; None: the local control plane's. One through a
    /// [`crate::stall_proxy::StallProxy`] makes its API calls slow or hang.
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// A kwok node of a fleet.
#[derive(Debug, Clone)]
pub struct FleetNode {
    /// The node's name, `<namespace>-<pool>-<i>`.
    pub name: String,
    /// The EdgePool it belongs to.
    pub pool: String,
}

/// One test's namespace, operator and fleet, made by [`Fleet::start`]. Call
/// [`Fleet::finish`] at the end; a test that fails leaves the namespace and the nodes
/// behind for inspection.
pub struct Fleet {
    /// A client for the local control plane.
    pub client: Client,
    /// The test's namespace, where all of the fleet's objects are.
    pub namespace: TestNamespace,
    /// The operator of the namespace (killable and restartable).
    pub operator: Operator,
    /// The kwok nodes, pool by pool, in the order of [`FleetSpec::pools`].
    pub nodes: Vec<FleetNode>,
    /// An HTTP client with [`FleetSpec::http_timeout`].
    pub http: reqwest::Client,
}

impl Fleet {
    /// Creates the namespace, starts an operator for it, creates the kwok nodes,
    /// ConfigMap [`CONFIG_MAP`], Model [`MODEL`] at 1.0, one EdgePool per pool and
    /// rollout [`ROLLOUT`] of 1.0 to every pool, then waits until 1.0 is Ready.
    pub async fn start(spec: FleetSpec<'_>) -> anyhow::Result<Fleet> {
        let client = client().await?;
        install_crds(&client).await?;
        let namespace = TestNamespace::create(&client, spec.prefix).await?;
        let ns = namespace.name().to_string();
        let operator = match &spec.kubeconfig {
            Some(kubeconfig) => {
                Operator::start_with_kubeconfig(&ns, spec.operator_args, kubeconfig).await?
            }
            None => Operator::start_with_args(&ns, spec.operator_args).await?,
        };
        let mut nodes = Vec::new();
        for &(pool, count) in spec.pools {
            for i in 0..count {
                let name = format!("{ns}-{pool}-{i}");
                create_kwok_node(
                    &client,
                    &name,
                    &[(TEST_LABEL, ns.as_str()), (SITE_LABEL, pool)],
                )
                .await?;
                nodes.push(FleetNode {
                    name,
                    pool: pool.to_string(),
                });
            }
        }
        let fleet = Fleet {
            client,
            namespace,
            operator,
            nodes,
            http: reqwest::Client::builder()
                .timeout(spec.http_timeout)
                .build()?,
        };
        fleet.create_objects(&spec).await?;
        Ok(fleet)
    }

    async fn create_objects(&self, spec: &FleetSpec<'_>) -> anyhow::Result<()> {
        let pools: Vec<(&str, Value)> = spec
            .pools
            .iter()
            .map(|&(pool, _)| {
                let selector =
                    json!({ "matchLabels": { TEST_LABEL: self.ns(), SITE_LABEL: pool } });
                (pool, selector)
            })
            .collect();
        create_model_and_pools(
            &self.client,
            self.ns(),
            &spec.model_files,
            &pools,
            spec.auto_rollback,
            WAIT,
        )
        .await
    }

    /// The test's namespace.
    pub fn ns(&self) -> &str {
        self.namespace.name()
    }

    /// An API of `K` objects in the test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), self.ns())
    }

    /// Waits until `version` of Model [`MODEL`] is Ready.
    pub async fn wait_model_version(&self, version: &str) -> anyhow::Result<()> {
        model_objects::wait_model_version(&self.api(), MODEL, version, WAIT).await
    }

    /// Sets Model [`MODEL`] to `version` from the ConfigMap's key `key` and waits
    /// until that version is Ready. The rollout still says what it said, so no
    /// assignment changes yet.
    pub async fn make_version_ready(&self, version: &str, key: &str) -> anyhow::Result<()> {
        model_objects::make_version_ready(&self.api(), MODEL, CONFIG_MAP, version, key, WAIT).await
    }

    /// Merges `spec` into the spec of rollout [`ROLLOUT`], e.g.
    /// `json!({ "version": "2.0" })`.
    pub async fn patch_rollout(&self, spec: Value) -> anyhow::Result<()> {
        model_objects::patch_rollout(&self.api(), ROLLOUT, spec).await
    }

    /// Rollout [`ROLLOUT`] as it is now.
    pub async fn rollout(&self) -> anyhow::Result<ModelRollout> {
        Ok(self.api::<ModelRollout>().get(ROLLOUT).await?)
    }

    /// Waits until the status of rollout [`ROLLOUT`] satisfies `condition`; `what`
    /// names the state in the error, which shows the operator's log.
    pub async fn wait_rollout(
        &self,
        what: &str,
        condition: impl Fn(&ModelRolloutStatus) -> bool,
    ) -> anyhow::Result<ModelRollout> {
        self.wait_named_rollout(ROLLOUT, what, condition).await
    }

    /// [`Fleet::wait_rollout`] for the rollout `name`.
    pub async fn wait_named_rollout(
        &self,
        name: &str,
        what: &str,
        condition: impl Fn(&ModelRolloutStatus) -> bool,
    ) -> anyhow::Result<ModelRollout> {
        wait_for(&self.api::<ModelRollout>(), name, WAIT, |r| {
            r.status.as_ref().is_some_and(&condition)
        })
        .await
        .with_context(|| {
            format!(
                "rollout {name} should be {what}; operator log:\n{}",
                self.operator.logs()
            )
        })
    }

    /// The agent pod the DaemonSet of the node's pool runs on `node` (kwok fakes it
    /// Running), once it exists.
    pub async fn agent_pod(&self, node: &str) -> anyhow::Result<String> {
        let pool = self.pool_of(node)?;
        let pods = self.api::<Pod>();
        let deadline = Instant::now() + WAIT;
        loop {
            let listed = pods
                .list(&ListParams::default().labels(&format!("shoal.dev/pool={pool}")))
                .await?;
            let on_node = listed
                .items
                .into_iter()
                .find(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node));
            if let Some(name) = on_node.and_then(|pod| pod.metadata.name) {
                return Ok(name);
            }
            ensure!(
                Instant::now() < deadline,
                "the DaemonSet of pool {pool} put no agent pod on node {node} within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A token of the agent's ServiceAccount with audience [`AUDIENCE`], bound to the
    /// agent pod on `node`: what the kubelet would project into that pod.
    pub async fn agent_token(&self, node: &str) -> anyhow::Result<String> {
        let account = agent_service_account(self.pool_of(node)?);
        let pod = self.agent_pod(node).await?;
        pod_token(&self.client, self.ns(), &account, &pod, AUDIENCE).await
    }

    /// Starts a `shoal-agent` on the identity of `node` (with [`Fleet::agent_token`])
    /// against `control_plane` (the operator's agent API, or a [`Relay`] to it),
    /// reporting every second, with `extra_args`. It returns once the agent listens,
    /// not once it serves.
    pub async fn start_agent(
        &self,
        node: &str,
        control_plane: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<Agent> {
        let token = self.agent_token(node).await?;
        let mut args = AGENT_ARGS.to_vec();
        args.extend_from_slice(extra_args);
        Agent::start(control_plane, node, &token, &args).await
    }

    fn pool_of(&self, node: &str) -> anyhow::Result<&str> {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.pool.as_str())
            .with_context(|| format!("{node} is not a node of this fleet"))
    }

    /// The test passed: remove the nodes, stop the operator, delete the namespace.
    /// Stop the test's agents first.
    pub async fn finish(self) -> anyhow::Result<()> {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        delete_nodes(&self.client, &nodes).await?;
        self.operator.stop().await?;
        self.namespace.delete().await
    }
}

/// In namespace `ns`: ConfigMap [`CONFIG_MAP`] with `model_files` (key, ONNX bytes),
/// Model [`MODEL`] at version 1.0 from key `v1`, one EdgePool per entry of `pools`
/// (name, node selector), and rollout [`ROLLOUT`] of 1.0 to all of them with
/// `auto_rollback`; then waits (up to `wait`) until 1.0 is Ready. The fleet makes
/// these objects, and so does the real-node test, whose pools select other nodes.
pub async fn create_model_and_pools(
    client: &Client,
    ns: &str,
    model_files: &[(&str, Vec<u8>)],
    pools: &[(&str, Value)],
    auto_rollback: bool,
    wait: Duration,
) -> anyhow::Result<()> {
    let files: Vec<(&str, &[u8])> = model_files
        .iter()
        .map(|(key, bytes)| (*key, bytes.as_slice()))
        .collect();
    create_config_map(&Api::namespaced(client.clone(), ns), CONFIG_MAP, &files).await?;
    let models: Api<Model> = Api::namespaced(client.clone(), ns);
    create_model(
        &models,
        MODEL,
        json!({ "version": "1.0", "source": { "configMap": { "name": CONFIG_MAP, "key": "v1" } } }),
    )
    .await?;
    let edge_pools: Api<EdgePool> = Api::namespaced(client.clone(), ns);
    for (pool, selector) in pools {
        create_edge_pool(&edge_pools, pool, selector.clone()).await?;
    }
    // The first rollout of the model: nothing is served yet, so every agent gets
    // 1.0 at once.
    let names: Vec<&str> = pools.iter().map(|(pool, _)| *pool).collect();
    create_rollout(
        &Api::namespaced(client.clone(), ns),
        ROLLOUT,
        json!({ "model": MODEL, "version": "1.0", "pools": names, "autoRollback": auto_rollback }),
    )
    .await?;
    model_objects::wait_model_version(&models, MODEL, "1.0", wait).await
}

/// The ServiceAccount the agent pods of `pool` run as, `shoal-agent-<pool>`.
pub fn agent_service_account(pool: &str) -> String {
    format!("shoal-agent-{pool}")
}

// ---------------------------------------------------------------------------
// Asking an agent what it serves

/// `GET <agent_url>/v2/models/ranker` → Ok(Some(versions)); Ok(None) when the agent
/// answers that it does not serve `ranker`; Err when it does not answer, or answers
/// anything else.
pub async fn served_versions(
    http: &reqwest::Client,
    agent_url: &str,
) -> anyhow::Result<Option<Vec<String>>> {
    let response = http
        .get(format!("{agent_url}/v2/models/{MODEL}"))
        .send()
        .await?;
    if response.status() == 404 {
        return Ok(None);
    }
    ensure!(
        response.status().is_success(),
        "metadata answered {}",
        response.status()
    );
    let body: Value = serde_json::from_slice(&response.bytes().await?)?;
    Ok(body["versions"].as_array().map(|versions| {
        versions
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }))
}

/// Whether the agent's metadata for `ranker` lists exactly `version` (false when the
/// agent does not answer).
pub async fn serves_only(http: &reqwest::Client, agent: &Agent, version: &str) -> bool {
    let versions = served_versions(http, agent.url()).await.ok().flatten();
    versions == Some(vec![version.to_string()])
}

/// Waits (up to [`WAIT`]) until the agent's metadata for `ranker` lists exactly
/// `version`; the error shows the agent's log.
pub async fn wait_serving(
    http: &reqwest::Client,
    agent: &Agent,
    version: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let versions = served_versions(http, agent.url()).await.ok().flatten();
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

// ---------------------------------------------------------------------------
// Inference requests

/// The body of an inference request for `ranker` with the tokens `tokens`.
pub fn infer_body(tokens: [i32; 4]) -> Value {
    json!({ "inputs": [{ "name": "tokens", "datatype": "INT32", "shape": [1, 4], "data": tokens }] })
}

/// The answer to one inference request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The HTTP status, or the transport error.
    pub status: Result<u16, String>,
    /// The answer's `model_version`.
    pub model_version: Option<String>,
    /// The answer's first output, `scores`.
    pub scores: Vec<f64>,
}

impl Outcome {
    /// Whether the agent answered 200.
    pub fn ok(&self) -> bool {
        self.status == Ok(200)
    }

    /// "1.0" or "2.0" when the answer's version and its scores agree on it.
    pub fn version(&self) -> Option<&'static str> {
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

/// Sends one inference request with [`TOKENS`] to the agent at `agent_url`.
pub async fn infer(http: &reqwest::Client, agent_url: &str) -> Outcome {
    let response = http
        .post(format!("{agent_url}/v2/models/{MODEL}/infer"))
        .header("content-type", "application/json")
        .body(infer_body(TOKENS).to_string())
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

/// Sends `count` requests one after another and checks each is 200 from `version`.
pub async fn ensure_serves(agent: &Agent, version: &str, count: usize) -> anyhow::Result<()> {
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

/// Clients sending inference requests to one agent, each waiting `pause` after every
/// answer, until [`Load::finish`], `deadline` passes or `budget` requests were sent
/// in all.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    /// Starts `clients` clients sending to the agent at `agent_url`.
    pub fn start(
        agent_url: &str,
        clients: usize,
        pause: Duration,
        deadline: Duration,
        budget: usize,
    ) -> Load {
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
                    let mut outcomes = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < until
                        && sent.fetch_add(1, Ordering::Relaxed) < budget
                    {
                        outcomes.push(infer(&http, &url).await);
                        tokio::time::sleep(pause).await;
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

    /// How many requests the clients have sent (or are sending) so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the clients; each client's outcomes, in the order it sent them.
    pub async fn finish(self) -> anyhow::Result<Vec<Vec<Outcome>>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for client in self.clients {
            all.push(client.await.context("a load client panicked")?);
        }
        Ok(all)
    }
}

/// Fails with the first few failures if any request was not answered 200; else the
/// number of requests.
pub fn ensure_no_failures(what: &str, outcomes: &[Vec<Outcome>]) -> anyhow::Result<usize> {
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

/// [`ensure_no_failures`], and fails unless every answer came from `version` (its
/// `model_version` and its scores); else the number of requests.
pub fn ensure_all_answered_by(
    version: &str,
    what: &str,
    outcomes: &[Vec<Outcome>],
) -> anyhow::Result<usize> {
    let total = ensure_no_failures(what, outcomes)?;
    let other = outcomes
        .iter()
        .flatten()
        .find(|o| o.version() != Some(version));
    ensure!(
        other.is_none(),
        "{what}: every answer should come from {version}, yet: {other:?}"
    );
    Ok(total)
}

// ---------------------------------------------------------------------------
// The relay between an agent and the operator

/// Size of the pieces a throttled [`Relay`] streams artifact downloads in.
const THROTTLE_PIECE: usize = 16 * 1024;
/// The pause before each piece of a throttled download.
const THROTTLE_PAUSE: Duration = Duration::from_millis(50);

/// A relay between one agent and the operator's agent API, for the agent's
/// `--control-plane`: it keeps a copy of every report body the agent POSTs (what
/// actually goes over the wire) and, when `throttle` is set, streams artifact
/// downloads 16 KiB at a time with a 50 ms pause before each piece, like a slow WAN
/// link. Dropping it stops it.
pub struct Relay {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    reports: Arc<Mutex<Vec<Vec<u8>>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying to `upstream` (the operator's agent API URL) for the agent of
    /// `node`.
    pub async fn start(upstream: String, node: &str, throttle: bool) -> anyhow::Result<Relay> {
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

    /// Every report body relayed so far, as text and parsed.
    pub fn reports(&self) -> anyhow::Result<Vec<(String, Value)>> {
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

    /// Waits (up to 60 s) for a relayed report in which `matches` holds for some
    /// entry of `models`, and returns that entry, from the latest such report. `what`
    /// names the entry in the error.
    pub async fn wait_for_model(
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
    /// Waits (up to 60 s) for a relayed report in which [`MODEL`] `version` is in
    /// `state` (`Serving`, `Failed`, …) and returns that entry of `models`.
    pub async fn wait_for_model_state(&self, version: &str, state: &str) -> anyhow::Result<Value> {
        self.wait_for_model(&format!("{MODEL} {version} {state}"), |model| {
            model["name"] == MODEL && model["version"] == version && model["state"] == state
        })
        .await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Forwards one request of the agent to `upstream`, keeping a copy of the body if it
/// is a report (a POST to `report_route`), and throttling the answer if it is an
/// artifact download and `throttle` is set.
async fn relay(
    request: axum::extract::Request,
    http: &reqwest::Client,
    upstream: &str,
    report_route: &str,
    captured: &Mutex<Vec<Vec<u8>>>,
    throttle: bool,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use futures::StreamExt as _;
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
    let is_download = parts.uri.path().starts_with(&artifact_path(""));
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
