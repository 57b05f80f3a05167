//! The harness of Shoal's integration tests: a client for the local control plane
//! (`make cluster-up`), the CRDs, one namespace and one operator process per test
//! (killable and restartable), managed-mode `shoal-agent` processes for the end-to-end
//! tests, and small helpers to wait on objects, serve a model file, make kwok nodes,
//! and make the tokens and certificates the agent API tests need. The fleet of the
//! agent, fault and rollout tests (a namespace, an operator, kwok nodes in EdgePools,
//! a Model and a ModelRollout, and helpers for the agents on those nodes) is in
//! [`fleet`].

pub mod fleet;
pub mod real_node;

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// Field manager of everything the tests server-side apply.
pub const FIELD_MANAGER: &str = "shoal-tests";
/// Annotation kwok looks for (`--manage-nodes-with-annotation-selector`), and the key
/// of the NoSchedule taint our fake nodes carry.
pub const KWOK_NODE_KEY: &str = "kwok.x-k8s.io/node";
/// Label on every node the tests create: `kubectl delete nodes -l shoal.dev/test-node`
/// removes what a failed run left behind.
pub const TEST_NODE_LABEL: &str = "shoal.dev/test-node";

const POLL_INTERVAL: Duration = Duration::from_millis(250);
const API_TIMEOUT: Duration = Duration::from_secs(10);
const OPERATOR_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Operator::wait_for_metric_line`] and
/// [`Operator::wait_for_metric_starting_with`] poll `/metrics`.
const METRIC_TIMEOUT: Duration = Duration::from_secs(60);

/// The kubeconfig the tests use: `$KUBECONFIG` (the Makefile points it at the local
/// control plane), else the one `make cluster-up` writes. Never `~/.kube/config`:
/// the tests create Nodes and CRDs, which do not belong in somebody's real cluster.
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => workspace_dir().join("target/cluster/kubeconfig"),
    }
}

/// The workspace root (the directory of the root Cargo.toml).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// A client for the local control plane, after checking that it answers.
pub async fn client() -> anyhow::Result<Client> {
    let path = kubeconfig_path();
    let hint = "start the local control plane with `make cluster-up` (it writes target/cluster/kubeconfig)";
    let kubeconfig = Kubeconfig::read_from(&path)
        .with_context(|| format!("cannot read the kubeconfig {}; {hint}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("the kubeconfig {} is not usable; {hint}", path.display()))?;
    let host = config.cluster_url.host().unwrap_or_default().to_string();
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]") {
        bail!(
            "KUBECONFIG={} points at {}, not a control plane on this machine; the tests create \
             Nodes and CRDs, so they only run against the local one: {hint}",
            path.display(),
            config.cluster_url
        );
    }
    let client = Client::try_from(config).context("cannot build a Kubernetes client")?;
    match tokio::time::timeout(API_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(err)) => bail!(
            "the Kubernetes API server in {} does not answer ({err}); {hint}",
            path.display()
        ),
        Err(_) => bail!(
            "the Kubernetes API server in {} did not answer within {API_TIMEOUT:?}; {hint}",
            path.display()
        ),
    }
}

static CRDS_INSTALLED: OnceCell<()> = OnceCell::const_new();

/// Server-side applies `shoal_api::crds()` and waits until each is Established.
/// Idempotent; each test binary does the work once.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    CRDS_INSTALLED
        .get_or_try_init(|| apply_crds(client))
        .await?;
    Ok(())
}

async fn apply_crds(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in shoal_api::crds() {
        let name = crd
            .metadata
            .name
            .clone()
            .context("a CRD from shoal_api::crds() has no name")?;
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("the API server refused CRD {name}"))?;
        names.push(name);
    }
    for name in names {
        wait_for(&api, &name, Duration::from_secs(60), |crd| {
            crd.status
                .as_ref()
                .and_then(|status| status.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        })
        .await?;
    }
    Ok(())
}

/// A namespace of its own for one test. Call `delete()` at the end; a test that
/// fails leaves its namespace behind for inspection and says so.
pub struct TestNamespace {
    client: Client,
    name: String,
    deleted: bool,
}

impl TestNamespace {
    /// Creates the namespace `<prefix>-<random suffix>`.
    pub async fn create(client: &Client, prefix: &str) -> anyhow::Result<TestNamespace> {
        let name = unique_name(prefix);
        let namespace = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "shoal.dev/test".to_string(),
                    "true".to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("cannot create namespace {name}"))?;
        Ok(TestNamespace {
            client: client.clone(),
            name,
            deleted: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts deleting the namespace (the namespace controller finishes it).
    pub async fn delete(mut self) -> anyhow::Result<()> {
        self.deleted = true;
        Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await
            .with_context(|| format!("cannot delete namespace {}", self.name))?;
        Ok(())
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if !self.deleted {
            eprintln!(
                "namespace {0} was left for inspection; remove it with `kubectl delete namespace {0}`",
                self.name
            );
        }
    }
}

/// `<prefix>-<8 hex digits>`, different on every call.
pub fn unique_name(prefix: &str) -> String {
    // RandomState is seeded randomly per process and changes on every call: enough
    // to keep concurrent tests and repeated runs apart without a rand dependency.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{prefix}-{:08x}", hasher.finish() as u32)
}

/// A `shoal-operator run` process limited to one namespace, with its own artifact
/// directory, metrics port and agent API port. Call `stop()` at the end; if the test
/// ends any other way (a failed `?` or a panic), dropping it prints the operator's log.
pub struct Operator {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    namespace: String,
    extra_args: Vec<String>,
    metrics_port: u16,
    metrics_url: String,
    agent_api_addr: String,
    /// False between [`Operator::kill`] and [`Operator::restart`].
    running: bool,
    stopped: bool,
}

impl Operator {
    /// Spawns `$SHOAL_OPERATOR_BIN run --namespace <namespace> …` and waits until its
    /// `/readyz` answers 200.
    pub async fn start(namespace: &str) -> anyhow::Result<Operator> {
        Self::start_with_args(namespace, &[]).await
    }

    /// [`Operator::start`] with more flags for `shoal-operator run`, such as
    /// `--agent-stale-after 10s` or `--tls-cert …`.
    pub async fn start_with_args(namespace: &str, extra_args: &[&str]) -> anyhow::Result<Operator> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-operator-")
            .tempdir()?;
        let port = free_port()?;
        let agent_api_addr = format!("127.0.0.1:{}", free_port()?);
        let extra_args: Vec<String> = extra_args.iter().map(|arg| arg.to_string()).collect();
        let child = spawn_operator(dir.path(), namespace, port, &agent_api_addr, &extra_args)?;
        let mut operator = Operator {
            child,
            dir,
            namespace: namespace.to_string(),
            extra_args,
            metrics_port: port,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            agent_api_addr,
            running: true,
            stopped: false,
        };
        operator.wait_ready(port).await?;
        Ok(operator)
    }

    /// The operator's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process is still running (it did not exit by itself).
    pub fn is_alive(&mut self) -> bool {
        self.running && matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the operator process but keeps its directory (artifact store, log) and
    /// ports, so [`Operator::restart`] brings the same operator back.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if self.running {
            self.child
                .kill()
                .await
                .context("cannot kill shoal-operator")?;
            self.running = false;
        }
        Ok(())
    }

    /// Kills the operator if it runs, then starts it again with the same flags,
    /// artifact store and ports (its log is appended to), and waits until ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.child = spawn_operator(
            self.dir.path(),
            &self.namespace,
            self.metrics_port,
            &self.agent_api_addr,
            &self.extra_args,
        )?;
        self.running = true;
        self.wait_ready(self.metrics_port).await
    }

    async fn wait_ready(&mut self, port: u16) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + OPERATOR_READY_TIMEOUT;
        loop {
            if let Some(exit) = self.child.try_wait()? {
                bail!(
                    "shoal-operator exited with {exit} before it was ready; its log:\n{}",
                    self.logs()
                );
            }
            if let Ok(response) = http.get(&url).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "shoal-operator did not answer 200 on {url} within {OPERATOR_READY_TIMEOUT:?}; its log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The operator's content-addressed artifact store (`<dir>/sha256/<hex>`).
    pub fn artifact_dir(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    /// `http://127.0.0.1:<port>/metrics`.
    pub fn metrics_url(&self) -> &str {
        &self.metrics_url
    }

    /// `127.0.0.1:<port>`, where the agent API listens.
    pub fn agent_api_addr(&self) -> &str {
        &self.agent_api_addr
    }

    /// `http://127.0.0.1:<port>`, the agent API without TLS.
    pub fn agent_api_url(&self) -> String {
        format!("http://{}", self.agent_api_addr)
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let http = reqwest::Client::builder().timeout(API_TIMEOUT).build()?;
        let response = http.get(&self.metrics_url).send().await?;
        Ok(response.error_for_status()?.text().await?)
    }

    /// Polls the operator's `/metrics` (for up to 60 s) until one of its lines is
    /// exactly `line`, such as `shoal_fleet_agents{…,state="connected"} 1`.
    pub async fn wait_for_metric_line(&self, line: &str) -> anyhow::Result<()> {
        self.wait_for_metric(&format!("the line {line}"), |l| l == line)
            .await
    }

    /// Polls the operator's `/metrics` (for up to 60 s) until one of its lines starts
    /// with `prefix`, such as `shoal_agent_api_requests_total{route="report",code="204"}`.
    pub async fn wait_for_metric_starting_with(&self, prefix: &str) -> anyhow::Result<()> {
        self.wait_for_metric(&format!("a line starting with {prefix}"), |l| {
            l.starts_with(prefix)
        })
        .await
    }

    async fn wait_for_metric(
        &self,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + METRIC_TIMEOUT;
        loop {
            let text = self.metrics().await?;
            if text.lines().any(&matches) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the operator's /metrics has no {what} after {METRIC_TIMEOUT:?}:\n{text}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Everything the operator wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        let path = self.dir.path().join("operator.log");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|err| format!("(cannot read {}: {err})", path.display()))
    }

    /// Kills the operator; the test passed, so its log is not printed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stopped = true;
        if self.running {
            self.child
                .kill()
                .await
                .context("cannot stop shoal-operator")?;
        }
        Ok(())
    }
}

/// Spawns `shoal-operator run` for [`Operator`], appending to `<dir>/operator.log`.
fn spawn_operator(
    dir: &Path,
    namespace: &str,
    metrics_port: u16,
    agent_api_addr: &str,
    extra_args: &[String],
) -> anyhow::Result<tokio::process::Child> {
    let binary = operator_binary()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("operator.log"))?;
    tokio::process::Command::new(&binary)
        .arg("run")
        .args(["--namespace", namespace])
        .arg("--artifact-dir")
        .arg(dir.join("artifacts"))
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--agent-api-addr", agent_api_addr])
        // What the agent DaemonSet is told; the pods kwok fakes run no agent.
        .args(["--agent-api-url", &format!("http://{agent_api_addr}")])
        .args(extra_args)
        .env("KUBECONFIG", kubeconfig_path())
        .env("RUST_LOG", "info,shoal_operator=debug,kube=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))
}

impl Drop for Operator {
    fn drop(&mut self) {
        if !self.stopped {
            eprintln!(
                "---- shoal-operator log (the test did not finish) ----\n{}---- end of log ----",
                self.logs()
            );
        }
    }
}

fn operator_binary() -> anyhow::Result<PathBuf> {
    built_binary("SHOAL_OPERATOR_BIN", "shoal-operator")
}

/// A binary of the workspace: `$env_var` when set, else `<target>/debug/<name>`
/// (`$CARGO_TARGET_DIR`, else the workspace's `target`).
fn built_binary(env_var: &str, name: &str) -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os(env_var) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => workspace_dir().join("target"),
        }
        .join("debug")
        .join(name),
    };
    if !path.is_file() {
        bail!(
            "the binary {} does not exist; build it with `cargo build -p {name}` \
             or set {env_var} (`make integration-test` does both)",
            path.display()
        );
    }
    Ok(path)
}

/// A TCP port on 127.0.0.1 that is free right now.
pub fn free_port() -> anyhow::Result<u16> {
    // Not a port from bind(":0"): that comes from the kernel's ephemeral range, and any
    // outgoing connection on the machine (the operator's own calls to the API server)
    // can take it between the moment we pick it and the moment the process binds it.
    // Ports below that range (and below NodePorts, 30000-32767) are only ever taken by
    // an explicit bind, so a port that binds now stays ours, also across a restart.
    // The start is random per process so that concurrent test binaries rarely meet.
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    const LOWEST: u16 = 20_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading /proc/sys/net/ipv4/ip_local_port_range")?;
    let ephemeral_low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|low| low.parse().ok())
        .context("cannot parse /proc/sys/net/ipv4/ip_local_port_range")?;
    let highest = ephemeral_low.min(30_000);
    if highest <= LOWEST {
        bail!(
            "the ephemeral port range starts at {ephemeral_low}: no ports left for tests below it"
        );
    }
    let span = u32::from(highest - LOWEST);
    let next = NEXT.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        std::sync::atomic::AtomicU32::new(hasher.finish() as u32 % span)
    });
    for _ in 0..span {
        let offset = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % span;
        let port = LOWEST + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port on 127.0.0.1 between {LOWEST} and {highest}")
}

/// Polls `name` until `condition` holds and returns the object. On timeout the error
/// names the object and shows its last status (or that it never existed).
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    condition: impl Fn(&K) -> bool,
) -> anyhow::Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match api.get_opt(name).await {
            Ok(Some(object)) if condition(&object) => return Ok(object),
            Ok(Some(object)) => last_status(&object),
            Ok(None) => "it does not exist".to_string(),
            Err(err) => format!("reading it failed: {err}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {}/{name}; last seen: {last}",
                api.resource_url()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls until `name` no longer exists (deleted by us, or by the garbage collector).
pub async fn wait_until_gone<K>(api: &Api<K>, name: &str, timeout: Duration) -> anyhow::Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = Instant::now() + timeout;
    loop {
        match api.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) | Err(_) if Instant::now() >= deadline => {
                bail!(
                    "timed out after {timeout:?} waiting for {}/{name} to be deleted",
                    api.resource_url()
                )
            }
            Ok(Some(_)) | Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

fn last_status<K: Serialize>(object: &K) -> String {
    let value = serde_json::to_value(object).unwrap_or_default();
    match value.get("status") {
        Some(status) => serde_json::to_string_pretty(status).unwrap_or_default(),
        None => "it has no status".to_string(),
    }
}

/// Serves `bytes` at `http://127.0.0.1:<port>/model.onnx` until the handle is
/// aborted or the test's runtime ends. Returns the URL and the server task.
pub async fn serve_file(bytes: Vec<u8>) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let body = axum::body::Bytes::from(bytes);
    let app = axum::Router::new().route(
        "/model.onnx",
        axum::routing::get(move || async move { body.clone() }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/model.onnx", listener.local_addr()?);
    let handle = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("the test's file server stopped: {err}");
        }
    });
    Ok((url, handle))
}

/// Creates a Node that kwok manages (it becomes Ready, and pods scheduled on it are
/// faked as Running): 4 CPUs, 8Gi, 110 pods, the given labels plus
/// [`TEST_NODE_LABEL`], and a `kwok.x-k8s.io/node=fake:NoSchedule` taint.
pub async fn create_kwok_node(
    client: &Client,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<Node> {
    let mut all_labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    all_labels.insert(TEST_NODE_LABEL.to_string(), "true".to_string());
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": all_labels,
            "annotations": { KWOK_NODE_KEY: "fake" },
        },
        "spec": {
            "taints": [{ "key": KWOK_NODE_KEY, "value": "fake", "effect": "NoSchedule" }],
        },
        "status": {
            "capacity": { "cpu": "4", "memory": "8Gi", "pods": "110" },
            "allocatable": { "cpu": "4", "memory": "8Gi", "pods": "110" },
        },
    }))?;
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("cannot create node {name}"))
}

/// Deletes the given nodes; ones already gone are fine.
pub async fn delete_nodes(client: &Client, names: &[String]) -> anyhow::Result<()> {
    let api = Api::<Node>::all(client.clone());
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("cannot delete node {name}; remove leftovers with `kubectl delete nodes -l {TEST_NODE_LABEL}`")
                });
            }
        }
    }
    Ok(())
}

/// Lowercase hex SHA-256 of `bytes`, as `sha256sum` prints it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The magika 1.0.3 file-type classifier (3 MB; input `bytes` int32 [N, 2048],
/// output `target_label` float [N, 214]) from `$SHOAL_TEST_MAGIKA_ONNX`.
pub fn magika_onnx() -> anyhow::Result<Vec<u8>> {
    read_test_model("SHOAL_TEST_MAGIKA_ONNX", "magika-1.0.3/model.onnx")
}

/// PP-OCR mobile v2.0 text-direction classifier from rapidocr-onnxruntime 1.4.4
/// (585 KB, small enough for a ConfigMap, whose data is limited to 1 MiB; input `x`
/// float [N, 3, H, W], output float [N, 2]) from `$SHOAL_TEST_PPOCR_CLS_ONNX`.
pub fn ppocr_cls_onnx() -> anyhow::Result<Vec<u8>> {
    read_test_model(
        "SHOAL_TEST_PPOCR_CLS_ONNX",
        "rapidocr-onnxruntime-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    )
}

/// The example recommender (examples/recommender/) trained by `make example-model`:
/// `recommender.onnx` (input `user_id` int64 `[batch]`, output `scores` float
/// `[batch, 1682]`) and `validation.jsonl`, in `$SHOAL_RECOMMENDER_DIR`.
pub fn recommender_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("SHOAL_RECOMMENDER_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .context("SHOAL_RECOMMENDER_DIR is not set; run the tests with `make test` (or `make example-model` and export it)")?;
    anyhow::ensure!(
        dir.join("recommender.onnx").is_file(),
        "{} has no recommender.onnx; run `make example-model`",
        dir.display()
    );
    Ok(dir)
}

/// Reads a model from `$variable`, else from where `make test-models` caches it.
fn read_test_model(variable: &str, cached: &str) -> anyhow::Result<Vec<u8>> {
    let path = match std::env::var_os(variable) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => {
            let cache = match std::env::var_os("SHOAL_CACHE") {
                Some(cache) if !cache.is_empty() => PathBuf::from(cache),
                _ => {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/shoal")
                }
            };
            cache.join("models").join(cached)
        }
    };
    std::fs::read(&path).with_context(|| {
        format!("cannot read the test model {} (set {variable}); fetch the models with `make test-models`", path.display())
    })
}

/// A tiny ONNX model written byte by byte (protobuf), for the ConfigMap tests: a
/// ConfigMap holds at most 1 MiB, less than the real models we test with. It is a
/// linear scorer: `tokens` int32 [batch, 4] → Cast to float → MatMul with a 4×3
/// weight → `scores` float [batch, 3], opset 13.
pub fn tiny_onnx_model() -> Vec<u8> {
    tiny_onnx_model_scaled(1.0)
}

/// [`tiny_onnx_model`] with every weight multiplied by `scale`: another version of
/// the same signature whose bytes and outputs differ. Row-major weight `[k][j]` is
/// `scale * (3k + j) / 10`, so tokens `[1, 2, 3, 4]` score `scale * [6, 7, 8]`.
pub fn tiny_onnx_model_scaled(scale: f32) -> Vec<u8> {
    const FLOAT: u64 = 1;
    // Cast(to = FLOAT): AttributeProto {name: 1, i: 3, type: 20 (INT = 2)}.
    let to_float = message(&[
        bytes_field(1, b"to"),
        varint_field(3, FLOAT),
        varint_field(20, 2),
    ]);
    let cast = message(&[
        bytes_field(1, b"tokens"),
        bytes_field(2, b"tokens_f"),
        bytes_field(3, b"cast"),
        bytes_field(4, b"Cast"),
        bytes_field(5, &to_float),
    ]);
    let matmul = message(&[
        bytes_field(1, b"tokens_f"),
        bytes_field(1, b"weight"),
        bytes_field(2, b"scores"),
        bytes_field(3, b"score"),
        bytes_field(4, b"MatMul"),
    ]);
    // TensorProto {dims: 1, data_type: 2, name: 8, raw_data: 9 (little-endian floats)}.
    let weights: Vec<u8> = (0..12u8)
        .flat_map(|i| (scale * f32::from(i) / 10.0).to_le_bytes())
        .collect();
    let weight = message(&[
        varint_field(1, 4),
        varint_field(1, 3),
        varint_field(2, FLOAT),
        bytes_field(8, b"weight"),
        bytes_field(9, &weights),
    ]);
    scorer_onnx_model("tiny-scorer", &[cast, matmul], &weight)
}

/// An ONNX model (IR version 8, opset 13) with the signature of the tests' scorers,
/// input `tokens` int32 [batch, 4] and output `scores` float [batch, 3], whose graph
/// `graph_name` is made of `nodes` (encoded NodeProtos, in order) and `initializer`
/// (an encoded TensorProto).
pub fn scorer_onnx_model(graph_name: &str, nodes: &[Vec<u8>], initializer: &[u8]) -> Vec<u8> {
    const FLOAT: u64 = 1;
    const INT32: u64 = 6;
    let dim_param = |name: &str| message(&[bytes_field(2, name.as_bytes())]);
    let dim_value = |value: u64| message(&[varint_field(1, value)]);
    let value_info = |name: &str, elem_type: u64, dims: &[Vec<u8>]| {
        let shape: Vec<Vec<u8>> = dims.iter().map(|dim| bytes_field(1, dim)).collect();
        let tensor_type = message(&[varint_field(1, elem_type), bytes_field(2, &message(&shape))]);
        let type_proto = message(&[bytes_field(1, &tensor_type)]);
        message(&[bytes_field(1, name.as_bytes()), bytes_field(2, &type_proto)])
    };
    // GraphProto {node: 1, name: 2, initializer: 5, input: 11, output: 12}.
    let mut graph: Vec<Vec<u8>> = nodes.iter().map(|node| bytes_field(1, node)).collect();
    graph.push(bytes_field(2, graph_name.as_bytes()));
    graph.push(bytes_field(5, initializer));
    graph.push(bytes_field(
        11,
        &value_info("tokens", INT32, &[dim_param("batch"), dim_value(4)]),
    ));
    graph.push(bytes_field(
        12,
        &value_info("scores", FLOAT, &[dim_param("batch"), dim_value(3)]),
    ));
    // ModelProto {ir_version: 1, producer_name: 2, graph: 7, opset_import: 8 {version: 2}}.
    message(&[
        varint_field(1, 8),
        bytes_field(2, b"shoal-tests"),
        bytes_field(7, &message(&graph)),
        bytes_field(8, &message(&[varint_field(2, 13)])),
    ])
}

/// Protobuf encoding by hand, for test ONNX models: a message is its fields concatenated.
pub fn message(fields: &[Vec<u8>]) -> Vec<u8> {
    fields.concat()
}

/// A varint field (wire type 0).
pub fn varint_field(number: u64, value: u64) -> Vec<u8> {
    let mut out = varint(number << 3);
    out.extend(varint(value));
    out
}

/// A length-delimited field (wire type 2): bytes, strings, nested messages.
pub fn bytes_field(number: u64, value: &[u8]) -> Vec<u8> {
    let mut out = varint((number << 3) | 2);
    out.extend(varint(value.len() as u64));
    out.extend_from_slice(value);
    out
}

fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
    out
}

/// A token of `service_account` from the TokenRequest API with `audience`, bound to
/// the pod `pod` — what the kubelet projects into an agent's pod. The API server
/// adds the pod's node to such a token (`authentication.kubernetes.io/node-name`).
pub async fn pod_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    pod: &str,
    audience: &str,
) -> anyhow::Result<String> {
    let pod_uid = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(pod)
        .await
        .with_context(|| format!("cannot read pod {namespace}/{pod} to bind a token to it"))?
        .metadata
        .uid;
    let bound = BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.into()),
        uid: pod_uid,
    };
    request_token(client, namespace, service_account, audience, Some(bound)).await
}

/// A token of `service_account` with `audience`, bound to nothing (what
/// `kubectl create token` makes): valid, but it names no pod and no node.
pub async fn unbound_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    audience: &str,
) -> anyhow::Result<String> {
    request_token(client, namespace, service_account, audience, None).await
}

async fn request_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    audience: &str,
    bound: Option<BoundObjectReference>,
) -> anyhow::Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_string()],
            bound_object_ref: bound,
            expiration_seconds: Some(3600),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("the TokenRequest API refused a token for {namespace}/{service_account}")
        })?;
    Ok(answer
        .status
        .context("the TokenRequest answer has no status")?
        .token)
}

/// PEM files of a throwaway CA and a serving certificate it signed for 127.0.0.1
/// and localhost, made with `openssl` in `dir`.
pub struct TestCertificate {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a [`TestCertificate`] in `dir` with the `openssl` command (`make deps`
/// installs it).
pub fn serving_certificate(dir: &Path) -> anyhow::Result<TestCertificate> {
    certificate_for(dir, "IP:127.0.0.1,DNS:localhost")
}

/// A [`TestCertificate`] in `dir` whose serving certificate names `subject_alt_names`
/// (openssl syntax: `IP:10.0.0.200,DNS:shoal-operator.shoal-system.svc`).
pub fn certificate_for(dir: &Path, subject_alt_names: &str) -> anyhow::Result<TestCertificate> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("cannot run openssl; install it (`make deps`)")?;
        if !output.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=shoal-test-ca",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=shoal-operator",
    ])?;
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName={subject_alt_names}\nextendedKeyUsage=serverAuth\n"),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        "server.crt",
        "-extfile",
        "server.ext",
    ])?;
    Ok(TestCertificate {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    })
}

/// A managed-mode `shoal-agent` process with its own cache directory, token file and
/// listen port. Call `stop()` at the end; if the test ends any other way, dropping
/// it prints the agent's log.
pub struct Agent {
    child: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
    url: String,
    stopped: bool,
}

impl Agent {
    /// Spawns `$SHOAL_AGENT_BIN --control-plane <control_plane> --node <node>` with a
    /// fresh cache dir, `token` in a token file, a free listen port and `extra_args`
    /// (such as `--report-seconds 1`), and waits until `/v2/health/live` answers.
    pub async fn start(
        control_plane: &str,
        node: &str,
        token: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<Agent> {
        let dir = tempfile::Builder::new().prefix("shoal-agent-").tempdir()?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token)?;
        let listen = format!("127.0.0.1:{}", free_port()?);
        let mut args: Vec<String> = vec![
            "--control-plane".into(),
            control_plane.into(),
            "--node".into(),
            node.into(),
            "--cache-dir".into(),
            dir.path().join("cache").to_string_lossy().into_owned(),
            "--token-file".into(),
            token_file.to_string_lossy().into_owned(),
            "--listen".into(),
            listen.clone(),
        ];
        args.extend(extra_args.iter().map(|arg| arg.to_string()));
        let mut agent = Agent {
            child: None,
            dir,
            args,
            url: format!("http://{listen}"),
            stopped: false,
        };
        agent.spawn().await?;
        Ok(agent)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let binary = agent_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))?;
        let child = tokio::process::Command::new(&binary)
            .args(&self.args)
            .env("RUST_LOG", "info,shoal_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        self.child = Some(child);
        self.wait_live().await
    }

    async fn wait_live(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/v2/health/live", self.url);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + OPERATOR_READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(exit) = child.try_wait()?
            {
                bail!(
                    "shoal-agent exited with {exit} before it listened; its log:\n{}",
                    self.logs()
                );
            }
            if let Ok(response) = http.get(&url).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "shoal-agent did not answer 200 on {url} within {OPERATOR_READY_TIMEOUT:?}; its log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:<port>`, the agent's Open Inference Protocol server.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The agent's cache directory (`artifacts/sha256/<hex>`, `last-known-good.json`).
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Everything the agent wrote to stdout and stderr so far, over all restarts.
    pub fn logs(&self) -> String {
        let path = self.dir.path().join("agent.log");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|err| format!("(cannot read {}: {err})", path.display()))
    }

    /// Kills the agent process; its cache dir stays for [`Agent::restart`].
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("cannot kill shoal-agent")?;
        }
        Ok(())
    }

    /// Kills the agent and starts it again with the same flags, cache dir and port,
    /// then waits until it listens (by then it serves what its cache holds).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    /// Kills the agent; the test passed, so its log is not printed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stopped = true;
        self.kill().await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.stopped {
            eprintln!(
                "---- shoal-agent log (the test did not finish) ----\n{}---- end of log ----",
                self.logs()
            );
        }
    }
}

fn agent_binary() -> anyhow::Result<PathBuf> {
    built_binary("SHOAL_AGENT_BIN", "shoal-agent")
}

/// The `kubectl-shoal` plugin binary: `$SHOAL_KUBECTL_SHOAL_BIN`, else
/// `target/debug/kubectl-shoal` (`cargo build --workspace --bins` builds it).
pub fn kubectl_shoal_binary() -> anyhow::Result<PathBuf> {
    built_binary("SHOAL_KUBECTL_SHOAL_BIN", "kubectl-shoal")
}

/// The `shoal-agent` binary (`$SHOAL_AGENT_BIN`, else `target/debug/shoal-agent`),
/// for tests that run it in standalone mode (`--model NAME=PATH`).
pub fn shoal_agent_binary() -> anyhow::Result<PathBuf> {
    agent_binary()
}

/// [`tiny_onnx_model_scaled`] with an unused float initializer `padding` of about
/// `padding_bytes` bytes added to its graph: the same signature and outputs in a
/// bigger artifact, for tests that need a download or a load to take a while.
/// (Protobuf merges an embedded message field that appears twice, so the graph
/// appended here adds its initializer to the model's graph.)
pub fn tiny_onnx_model_padded(scale: f32, padding_bytes: usize) -> Vec<u8> {
    const FLOAT: u64 = 1;
    let floats = padding_bytes / 4;
    let raw: Vec<u8> = (0..floats)
        .flat_map(|i| ((i % 251) as f32).to_le_bytes())
        .collect();
    // TensorProto {dims: 1, data_type: 2, name: 8, raw_data: 9}.
    let padding = message(&[
        varint_field(1, floats as u64),
        varint_field(2, FLOAT),
        bytes_field(8, b"padding"),
        bytes_field(9, &raw),
    ]);
    let mut model = tiny_onnx_model_scaled(scale);
    // ModelProto.graph (7) → GraphProto.initializer (5).
    model.extend(bytes_field(7, &message(&[bytes_field(5, &padding)])));
    model
}

/// Stops one process of the local control plane (`etcd`, `kube-apiserver`, …) the way
/// `tests/cluster/down.sh` does, by its PID file, and returns its command line so that
/// [`start_control_plane_process`] can start it again exactly as `up.sh` did. etcd
/// keeps its data directory: the cluster's objects survive.
pub async fn stop_control_plane_process(name: &str) -> anyhow::Result<Vec<String>> {
    stop_recorded_process(&workspace_dir().join("target/cluster"), name).await
}

/// Stops the process whose PID `<state>/pids/<name>.pid` records (SIGTERM, SIGKILL
/// after 5 s) and returns its command line, for [`start_recorded_process`]. The
/// local control plane (`target/cluster`) and the real node (`target/node`) keep
/// their PID files and logs this way.
pub async fn stop_recorded_process(state: &Path, name: &str) -> anyhow::Result<Vec<String>> {
    let pid_file = state.join("pids").join(format!("{name}.pid"));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?
        .trim()
        .parse()
        .context("a PID")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("{name} (pid {pid}) is not running"))?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    let status = tokio::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill {pid} ({name}) failed");
    // Like down.sh: 5 s to stop gracefully (the API server drains its watches for
    // longer than that), then SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_runs(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if process_runs(pid) {
        tokio::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_runs(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    anyhow::ensure!(!process_runs(pid), "{name} (pid {pid}) did not stop");
    Ok(args)
}

/// Whether `pid` is a live process: a zombie (exited, not yet reaped by whoever
/// inherited it) counts as stopped.
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Starts a control-plane process stopped by [`stop_control_plane_process`] with the
/// same command line, its output appended to its log, and records its new PID so
/// that `tests/cluster/down.sh` stops it.
pub fn start_control_plane_process(name: &str, args: &[String]) -> anyhow::Result<()> {
    start_recorded_process(&workspace_dir().join("target/cluster"), name, args)
}

/// Starts a process stopped by [`stop_recorded_process`] again with `args`, its
/// output appended to `<state>/logs/<name>.log`, and records its new PID in
/// `<state>/pids/<name>.pid` so that the scripts that stop it find it.
pub fn start_recorded_process(state: &Path, name: &str, args: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("logs").join(format!("{name}.log")))?;
    let (program, rest) = args.split_first().context("an empty command line")?;
    let child = std::process::Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group, like up.sh's setsid: not killed with the test.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name} again"))?;
    std::fs::write(
        state.join("pids").join(format!("{name}.pid")),
        format!("{}\n", child.id()),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ephemeral_range() -> anyhow::Result<(u16, u16)> {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
        let bounds: Vec<u16> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        match bounds[..] {
            [low, high] => Ok((low, high)),
            _ => bail!("cannot parse ip_local_port_range: {text:?}"),
        }
    }

    // A port in the kernel's ephemeral range can be taken by any outgoing connection
    // (the operator's own calls to the API server) between the moment the harness picks
    // it and the moment a process binds it: "Address already in use" in CI.
    #[test]
    fn free_ports_lie_outside_the_ephemeral_range_and_are_never_handed_out_twice()
    -> anyhow::Result<()> {
        let (low, high) = ephemeral_range()?;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let port = free_port()?;
            assert!(
                !(low..=high).contains(&port),
                "port {port} is inside the ephemeral range {low}-{high}"
            );
            assert!(seen.insert(port), "port {port} was handed out twice");
            std::net::TcpListener::bind(("127.0.0.1", port))?;
        }
        Ok(())
    }
}
