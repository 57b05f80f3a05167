//! End to end rollouts: a real operator, five real `shoal-agent` processes on the
//! identities of five kwok nodes in two pools (`stores`: 3, `warehouses`: 2), real
//! inference traffic on every agent, and ModelRollouts with steps, analysis,
//! automatic rollback, an operator restart and the `kubectl shoal` plugin.
//!
//! Model `ranker` has three Ready versions: 1.0 and 2.0 are the tiny scorer of the
//! harness (2.0's weights doubled); 3.0 is deliberately bad: same signature, loads
//! and warms up (the agent warms up with zeros) but every request with a token of 1
//! or more fails (a Gather over a one-row table indexed by the tokens), so the agent
//! answers 500 and counts an error (checked on its own by
//! `bad_model_loads_and_warms_up_but_fails_real_requests`).
//!
//! While a test runs, a watcher polls every agent's OIP metadata every 200 ms and
//! records any version outside the test's plan; every test asserts it recorded none.

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shoal_api::{Model, ModelRollout, RolloutPhase};
use shoal_tests::agent_process::Agent;
use shoal_tests::binaries::{kubectl_shoal_binary, shoal_agent_binary};
use shoal_tests::cluster::kubeconfig_path;
use shoal_tests::fleet::{
    CONFIG_MAP, Fleet, FleetSpec, MODEL, ROLLOUT, TOKENS, WAIT, infer_body, served_versions,
};
use shoal_tests::onnx_models::{
    bytes_field, float_tensor, message, scorer_onnx_model, tiny_onnx_model_scaled, varint_field,
};
use shoal_tests::ports::free_port;
use shoal_tests::recorded_processes::{start_control_plane_process, stop_control_plane_process};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tests share the control plane; the one that restarts the API server and etcd
/// takes it alone (write), every other test of this file shares it (read).
static CONTROL_PLANE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
const STORES: &str = "stores";
const WAREHOUSES: &str = "warehouses";
const POOLS: [(&str, usize); 2] = [(STORES, 3), (WAREHOUSES, 2)];
const V1: &str = "1.0";
const V2: &str = "2.0";
const V3: &str = "3.0";
/// Analysis settings of every test that has analysis.
const ANALYSIS: &str = r#"{"interval": "2s", "minRequests": 20, "maxErrorRate": 0.05}"#;

fn analysis_spec() -> Value {
    serde_json::from_str(ANALYSIS).expect("ANALYSIS is JSON")
}

// ---------------------------------------------------------------------------
// The bad model

/// Version 3.0: `tokens` int32 [batch, 4] → Cast to int64 → Gather(axis 0) from a
/// float table of ONE row [1, 3] → [batch, 4, 3] → ReduceMax(axes [1], keepdims 0)
/// → `scores` float [batch, 3]. The signature is v1's; zeros (the warm-up) gather
/// row 0 and work; any token >= 1 is out of the table: tract 0.23's Gather panics
/// on the slice index ("range end index 6 out of range for slice of length 3"),
/// the agent's blocking inference task ends with that panic and the agent answers
/// 500 ("the inference worker failed") and counts an error, request after request.
fn bad_onnx_model() -> Vec<u8> {
    const INT64: u64 = 7;
    // AttributeProto {name: 1, i: 3, ints: 8, type: 20 (INT = 2, INTS = 7)}.
    let int_attribute = |name: &str, value: u64| {
        message(&[
            bytes_field(1, name.as_bytes()),
            varint_field(3, value),
            varint_field(20, 2),
        ])
    };
    let node = |inputs: &[&str], output: &str, name: &str, op: &str, attributes: &[Vec<u8>]| {
        let mut fields: Vec<Vec<u8>> = inputs
            .iter()
            .map(|input| bytes_field(1, input.as_bytes()))
            .collect();
        fields.push(bytes_field(2, output.as_bytes()));
        fields.push(bytes_field(3, name.as_bytes()));
        fields.push(bytes_field(4, op.as_bytes()));
        fields.extend(attributes.iter().map(|a| bytes_field(5, a)));
        message(&fields)
    };
    let cast = node(
        &["tokens"],
        "tokens_i64",
        "cast",
        "Cast",
        &[int_attribute("to", INT64)],
    );
    let gather = node(
        &["table", "tokens_i64"],
        "gathered",
        "gather",
        "Gather",
        &[int_attribute("axis", 0)],
    );
    let axes = message(&[
        bytes_field(1, b"axes"),
        varint_field(8, 1),
        varint_field(20, 7),
    ]);
    let reduce = node(
        &["gathered"],
        "scores",
        "reduce",
        "ReduceMax",
        &[axes, int_attribute("keepdims", 0)],
    );
    let table = float_tensor("table", &[1, 3], &[0.5, 0.25, 0.125]);
    scorer_onnx_model("bad-scorer", &[cast, gather, reduce], &table)
}

async fn infer_status(http: &reqwest::Client, url: &str, tokens: [i32; 4]) -> anyhow::Result<u16> {
    let response = http
        .post(format!("{url}/v2/models/{MODEL}/infer"))
        .header("content-type", "application/json")
        .body(infer_body(tokens).to_string())
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// The premise of `bad_canary_is_rolled_back_automatically`, checked on a
/// standalone agent: 3.0 loads and warms up, answers zeros, and answers 500 (and
/// counts an error) for real tokens.
#[tokio::test]
async fn bad_model_loads_and_warms_up_but_fails_real_requests() -> anyhow::Result<()> {
    let _shared = CONTROL_PLANE.read().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.onnx");
    std::fs::write(&path, bad_onnx_model())?;
    let url = format!("http://127.0.0.1:{}", free_port()?);
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    let mut child = tokio::process::Command::new(shoal_agent_binary()?)
        .arg("--model")
        .arg(format!("{MODEL}:{V3}={}", path.display()))
        .args(["--listen", url.trim_start_matches("http://")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(log.try_clone()?))
        .stderr(std::process::Stdio::from(log))
        .kill_on_drop(true)
        .spawn()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let logs = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = child.try_wait()? {
            bail!("the agent exited with {exit}: {}", logs());
        }
        if let Ok(response) = http.get(format!("{url}/v2/health/ready")).send().await
            && response.status() == 200
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the agent never got ready with 3.0: {}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        infer_status(&http, &url, [0, 0, 0, 0]).await? == 200,
        "zeros work: {}",
        logs()
    );
    let first = http
        .post(format!("{url}/v2/models/{MODEL}/infer"))
        .header("content-type", "application/json")
        .body(infer_body(TOKENS).to_string())
        .send()
        .await?;
    eprintln!(
        "3.0 on real tokens: HTTP {} {}",
        first.status(),
        first.text().await?
    );
    for _ in 0..2 {
        let status = infer_status(&http, &url, TOKENS).await?;
        ensure!(
            (500..600).contains(&status),
            "real tokens fail with a 5xx, got {status}: {}",
            logs()
        );
    }
    ensure!(
        infer_status(&http, &url, [0, 0, 0, 0]).await? == 200,
        "the agent still answers after the failures: {}",
        logs()
    );
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let errors =
        format!(r#"shoal_agent_requests_total{{model="{MODEL}",version="{V3}",code="500"}} 3"#);
    ensure!(
        metrics.contains(&errors),
        "the agent counts the 3 failures as 500s: {metrics}"
    );
    child.kill().await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The fleet

/// One of the fleet's agents: the kwok node it runs as, and its pool.
struct FleetAgent {
    pool: String,
    node: String,
    agent: Agent,
}

/// One test's fleet (namespace, operator, 5 kwok nodes in 2 pools, Model `ranker`
/// with 1.0, 2.0 and 3.0 Ready, rollout `ranker-rollout` Succeeded at 1.0) and its
/// 5 agents serving 1.0.
struct Setup {
    fleet: Fleet,
    agents: Vec<FleetAgent>,
}

impl Setup {
    async fn start(prefix: &str) -> anyhow::Result<Setup> {
        let started = Instant::now();
        let fleet = Fleet::start(FleetSpec {
            prefix,
            operator_args: &[],
            pools: &POOLS,
            model_files: vec![
                ("v1", tiny_onnx_model_scaled(1.0)),
                ("v2", tiny_onnx_model_scaled(2.0)),
                ("v3", bad_onnx_model()),
            ],
            auto_rollback: true,
            http_timeout: Duration::from_secs(5),
            kubeconfig: None,
        })
        .await?;
        // 2.0 and 3.0 become Ready in the Model; the rollout still says 1.0.
        for (version, key) in [(V2, "v2"), (V3, "v3")] {
            fleet.make_version_ready(version, key).await?;
        }
        let mut agents = Vec::new();
        for node in &fleet.nodes {
            let agent = fleet
                .start_agent(&node.name, &fleet.operator.agent_api_url(), &[])
                .await?;
            agents.push(FleetAgent {
                pool: node.pool.clone(),
                node: node.name.clone(),
                agent,
            });
        }
        let setup = Setup { fleet, agents };
        setup.wait_all_serving(V1).await?;
        setup.wait_succeeded("Succeeded at 1.0", V1).await?;
        eprintln!(
            "[{}] setup: 5 agents serve {V1} after {:.1}s",
            setup.fleet.ns(),
            started.elapsed().as_secs_f64()
        );
        Ok(setup)
    }

    /// Waits until the rollout is Succeeded with `version` stable; `what` names that
    /// state in the error.
    async fn wait_succeeded(&self, what: &str, version: &str) -> anyhow::Result<ModelRollout> {
        self.fleet
            .wait_rollout(what, |s| {
                s.phase == Some(RolloutPhase::Succeeded)
                    && s.stable_version.as_deref() == Some(version)
            })
            .await
    }

    /// Waits until the rollout holds 2.0 as its canary, Paused at step index 1.
    async fn wait_canary_paused_at_step_1(&self, what: &str) -> anyhow::Result<ModelRollout> {
        self.fleet
            .wait_rollout(what, |s| {
                s.canary_version.as_deref() == Some(V2)
                    && s.phase == Some(RolloutPhase::Paused)
                    && s.current_step == Some(1)
            })
            .await
    }

    fn targets(&self) -> Vec<AgentTarget> {
        self.agents
            .iter()
            .map(|a| AgentTarget {
                node: a.node.clone(),
                url: a.agent.url().to_string(),
            })
            .collect()
    }

    /// What every agent serves now (`None`: not `ranker`, or no answer).
    async fn served(&self) -> Vec<Option<Vec<String>>> {
        let mut out = Vec::new();
        for agent in &self.agents {
            out.push(
                served_versions(&self.fleet.http, agent.agent.url())
                    .await
                    .ok()
                    .flatten(),
            );
        }
        out
    }

    /// Nodes serving exactly `version`, by pool.
    async fn nodes_serving(&self, version: &str) -> BTreeMap<String, BTreeSet<String>> {
        let served = self.served().await;
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (agent, versions) in self.agents.iter().zip(served) {
            let entry = out.entry(agent.pool.clone()).or_default();
            if versions.as_deref() == Some(&[version.to_string()][..]) {
                entry.insert(agent.node.clone());
            }
        }
        out
    }

    /// Waits until every agent's metadata lists exactly `version`.
    async fn wait_all_serving(&self, version: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let served = self.served().await;
            if served
                .iter()
                .all(|v| v.as_deref() == Some(&[version.to_string()][..]))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let rollout = self.fleet.rollout().await.ok();
                bail!(
                    "every agent should serve {version} within {WAIT:?}; they serve {served:?}; rollout status: {}\noperator log:\n{}",
                    status_json(rollout.as_ref()),
                    self.fleet.operator.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The Events about a ModelRollout: (type, reason, message).
    async fn events(&self, name: &str) -> anyhow::Result<Vec<(String, String, String)>> {
        let events = self
            .fleet
            .api::<Event>()
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await?;
        Ok(events
            .items
            .into_iter()
            .filter(|e| e.involved_object.kind.as_deref() == Some("ModelRollout"))
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                )
            })
            .collect())
    }

    /// Waits until the Events about `name` include every reason in `reasons`.
    async fn wait_events(
        &self,
        name: &str,
        reasons: &[&str],
    ) -> anyhow::Result<Vec<(String, String, String)>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.events(name).await?;
            if reasons
                .iter()
                .all(|r| events.iter().any(|(_, reason, _)| reason == r))
            {
                return Ok(events);
            }
            ensure!(
                Instant::now() < deadline,
                "the Events of {name} should include {reasons:?}; they are {events:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `kubectl-shoal <args> -n <ns>` with the test's kubeconfig; its stdout.
    async fn kubectl_shoal(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::process::Command::new(kubectl_shoal_binary()?)
            .args(args)
            .args(["-n", self.fleet.ns()])
            .env("KUBECONFIG", kubeconfig_path())
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        ensure!(
            output.status.success(),
            "kubectl-shoal {args:?} failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(stdout)
    }

    /// The test passed: stop the agents, remove the nodes, stop the operator,
    /// delete the namespace.
    async fn finish(self) -> anyhow::Result<()> {
        for agent in self.agents {
            agent.agent.stop().await?;
        }
        // Not an assertion (a conflict on a write is retried), but worth seeing.
        let warnings: Vec<String> = self
            .fleet
            .operator
            .logs()
            .lines()
            .filter(|line| line.contains("WARN") || line.contains("ERROR"))
            .map(str::to_string)
            .collect();
        if !warnings.is_empty() {
            eprintln!(
                "[{}] the operator logged {} warning(s)/error(s):\n{}",
                self.fleet.ns(),
                warnings.len(),
                warnings.join("\n")
            );
        }
        self.fleet.finish().await
    }
}

/// [`Setup::start`], then the watcher of the versions in `plan` and the load on
/// every agent.
async fn start_watched(prefix: &str, plan: &[&str]) -> anyhow::Result<(Setup, Watch, Load)> {
    let setup = Setup::start(prefix).await?;
    let watch = Watch::start(&setup.targets(), plan, setup.fleet.api());
    let load = Load::start(&setup.targets());
    Ok((setup, watch, load))
}

fn status_json(rollout: Option<&ModelRollout>) -> String {
    rollout
        .and_then(|r| r.status.as_ref())
        .and_then(|s| serde_json::to_string_pretty(s).ok())
        .unwrap_or_else(|| "(none)".into())
}

// ---------------------------------------------------------------------------
// Traffic and the watcher

#[derive(Clone)]
struct AgentTarget {
    node: String,
    url: String,
}

/// One client per agent sending real requests (tokens 1..4) every ~30 ms until
/// stopped or 150 s passed.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    server_errors: Arc<AtomicU64>,
    other: Arc<AtomicU64>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(targets: &[AgentTarget]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let server_errors = Arc::new(AtomicU64::new(0));
        let other = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(150);
        let clients = targets
            .iter()
            .map(|target| {
                let url = target.url.clone();
                let (stop, ok, server_errors, other) = (
                    stop.clone(),
                    ok.clone(),
                    server_errors.clone(),
                    other.clone(),
                );
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(5))
                        .build()
                        .expect("an HTTP client");
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        match infer_status(&http, &url, TOKENS).await {
                            Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(500..600) => server_errors.fetch_add(1, Ordering::Relaxed),
                            _ => other.fetch_add(1, Ordering::Relaxed),
                        };
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            server_errors,
            other,
            clients,
        }
    }

    /// Stops the clients and fails if any request was not answered 200 (`what`
    /// begins the error: "no request failed across the restart"); else the number of
    /// requests.
    async fn finish_without_failures(self, what: &str) -> anyhow::Result<u64> {
        let (ok, server_errors, other) = self.finish().await;
        ensure!(
            server_errors == 0 && other == 0,
            "{what}: {ok} ok, {server_errors} 5xx, {other} other"
        );
        Ok(ok)
    }

    /// Stops the clients: (200s, 5xx, anything else).
    async fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            let _ = client.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.server_errors.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
        )
    }
}

#[derive(Default)]
struct WatchState {
    /// The last answer of each agent (None: it does not serve `ranker`).
    current: Vec<Option<Vec<String>>>,
    /// Versions served outside the plan, or the model not served at all.
    violations: Vec<String>,
    /// Every change of what an agent serves: (when, node, versions).
    changes: Vec<(Instant, String, Option<Vec<String>>)>,
    /// When some agent first served each version.
    first_seen: BTreeMap<String, Instant>,
    /// The rollout's (phase, currentStep) as it changed.
    phases: Vec<(String, Option<i32>)>,
    /// A timeline of the rollout's status as it changed, for the test's output:
    /// (ms since the watcher started, "phase step weight | last analysis").
    timeline: Vec<(u128, String)>,
}

/// Polls every agent's metadata and the rollout every 200 ms.
struct Watch {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<WatchState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(targets: &[AgentTarget], plan: &[&str], rollouts: Api<ModelRollout>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(WatchState {
            current: targets.iter().map(|_| Some(vec![V1.to_string()])).collect(),
            ..Default::default()
        }));
        let plan: BTreeSet<String> = plan.iter().map(|v| v.to_string()).collect();
        let targets = targets.to_vec();
        let (stop_flag, shared) = (stop.clone(), state.clone());
        let watch_started = Instant::now();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client");
            while !stop_flag.load(Ordering::Relaxed) {
                let answers = futures::future::join_all(
                    targets.iter().map(|t| served_versions(&http, &t.url)),
                )
                .await;
                let rollout = rollouts.get(ROLLOUT).await.ok();
                let now = Instant::now();
                {
                    let mut state = lock(&shared);
                    for (ix, answer) in answers.into_iter().enumerate() {
                        // No answer (a busy machine): nothing learnt.
                        let Ok(versions) = answer else { continue };
                        let node = &targets[ix].node;
                        match &versions {
                            None => state
                                .violations
                                .push(format!("{node} stopped serving {MODEL}")),
                            Some(list) => {
                                for version in list {
                                    if !plan.contains(version) {
                                        state.violations.push(format!(
                                            "{node} served {version}, outside the plan {plan:?}"
                                        ));
                                    }
                                    state.first_seen.entry(version.clone()).or_insert(now);
                                }
                            }
                        }
                        if state.current[ix] != versions {
                            state.changes.push((now, node.clone(), versions.clone()));
                            state.current[ix] = versions;
                        }
                    }
                    if let Some(status) = rollout.and_then(|r| r.status) {
                        let entry = (
                            status
                                .phase
                                .map(|p| format!("{p:?}"))
                                .unwrap_or_else(|| "-".into()),
                            status.current_step,
                        );
                        let analysis = status
                            .last_analysis
                            .as_ref()
                            .map(|a| {
                                format!(
                                    "{} canary {} req {:.0}% err: {}",
                                    a.verdict,
                                    a.canary.requests,
                                    a.canary.error_rate * 100.0,
                                    a.message
                                )
                            })
                            .unwrap_or_default();
                        let line = format!(
                            "{} step {:?} weight {:?} | {analysis}",
                            entry.0, entry.1, status.weight
                        );
                        if state.timeline.last().map(|(_, l)| l) != Some(&line) {
                            let at = now.duration_since(watch_started).as_millis();
                            state.timeline.push((at, line));
                        }
                        if state.phases.last() != Some(&entry) {
                            state.phases.push(entry);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Watch { stop, state, task }
    }

    fn first_seen(&self, version: &str) -> Option<Instant> {
        lock(&self.state).first_seen.get(version).copied()
    }

    fn timeline(&self) -> String {
        lock(&self.state)
            .timeline
            .iter()
            .map(|(at, line)| format!("  +{at}ms {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn phases(&self) -> Vec<(String, Option<i32>)> {
        lock(&self.state).phases.clone()
    }

    fn changes_since(&self, since: Instant) -> Vec<(String, Option<Vec<String>>)> {
        lock(&self.state)
            .changes
            .iter()
            .filter(|(when, _, _)| *when >= since)
            .map(|(_, node, versions)| (node.clone(), versions.clone()))
            .collect()
    }

    /// Stops watching; fails if any agent served a version outside the plan.
    async fn finish(self) -> anyhow::Result<WatchState> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let state = std::mem::take(&mut *lock(&self.state));
        ensure!(
            state.violations.is_empty(),
            "no agent is ever assigned a version outside the plan, yet: {:#?}",
            state.violations
        );
        Ok(state)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits until every agent lists exactly `version`, then until the watcher saw it
/// too; when the watcher saw the last agent change to it (200 ms resolution).
async fn wait_all_on(setup: &Setup, watch: &Watch, version: &str) -> anyhow::Result<Instant> {
    setup.wait_all_serving(version).await?;
    let wanted = Some(vec![version.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        {
            let state = lock(&watch.state);
            if state.current.iter().all(|v| *v == wanted) {
                return Ok(state
                    .changes
                    .iter()
                    .rev()
                    .find(|(_, _, versions)| *versions == wanted)
                    .map_or_else(Instant::now, |(when, _, _)| *when));
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the watcher should see every agent on {version}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn canary_steps_analysis_then_everyone() -> anyhow::Result<()> {
    let _shared = CONTROL_PLANE.read().await;
    let (setup, watch, load) = start_watched("ro-canary", &[V1, V2]).await?;

    let steps = json!([
        { "setWeight": 20 },
        { "pause": { "duration": "2s" } },
        { "analysis": {} },
        { "setWeight": 60 },
        { "analysis": {} },
    ]);
    let patched = Instant::now();
    setup
        .fleet
        .patch_rollout(json!({ "version": V2, "steps": steps, "analysis": analysis_spec() }))
        .await?;

    // At weight 20 (the setWeight 20 step done, through the pause and the first
    // analysis): one store and one warehouse serve 2.0, seen on the agents.
    setup
        .wait_canary_paused_at_step_1("Paused at step index 1 (pause 2s)")
        .await?;
    let mut samples = 0;
    for _ in 0..6 {
        let before = setup.fleet.rollout().await?;
        let on_v2 = setup.nodes_serving(V2).await;
        let after = setup.fleet.rollout().await?;
        let weight_20 = |r: &ModelRollout| {
            r.status
                .as_ref()
                .is_some_and(|s| s.weight == Some(20) && s.current_step.unwrap_or(9) <= 2)
        };
        if !weight_20(&before) || !weight_20(&after) {
            break;
        }
        let counts: Vec<(&str, usize)> = on_v2.iter().map(|(p, n)| (p.as_str(), n.len())).collect();
        ensure!(
            counts == vec![(STORES, 1), (WAREHOUSES, 1)],
            "at setWeight 20 exactly ceil(20% of 3) = 1 store and ceil(20% of 2) = 1 warehouse \
             serve {V2}; the agents say {on_v2:?}; status: {}",
            status_json(Some(&after))
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(
        samples >= 2,
        "weight 20 should hold for a while (pause 2s + an analysis); sampled it only {samples} time(s); phases {:?}",
        watch.phases()
    );

    let all_on_v2 = wait_all_on(&setup, &watch, V2).await?;
    let rollout = setup.wait_succeeded("Succeeded at 2.0", V2).await?;
    let took = all_on_v2.duration_since(patched);
    eprintln!(
        "canary_steps_analysis_then_everyone: spec.version patched -> every agent serving {V2} in \
         {:.1}s (steps: setWeight 20, pause 2s, analysis, setWeight 60, analysis; analysis {ANALYSIS}; \
         agents report every 1s)",
        took.as_secs_f64()
    );
    let status = rollout.status.clone().unwrap_or_default();
    ensure!(
        status.weight == Some(100) && status.canary_version.as_deref() == Some(V2),
        "{}",
        status_json(Some(&rollout))
    );
    ensure!(
        status.history.iter().any(|h| h.version == V2
            && h.phase == RolloutPhase::Succeeded
            && h.from_version.as_deref() == Some(V1)),
        "the history records 2.0 Succeeded from 1.0: {:?}",
        status.history
    );
    let analysis = status
        .last_analysis
        .as_ref()
        .context("a last analysis is recorded")?;
    ensure!(
        analysis.verdict == "Pass",
        "the last analysis passed: {analysis:?}"
    );
    let phases = watch.phases();
    ensure!(
        phases.iter().any(|(p, _)| p == "Progressing") && phases.iter().any(|(p, _)| p == "Paused"),
        "the rollout went through Progressing and Paused: {phases:?}"
    );
    let events = setup
        .wait_events(ROLLOUT, &["RolloutStarted", "StepStarted", "Succeeded"])
        .await?;
    eprintln!("rollout timeline:\n{}", watch.timeline());
    eprintln!(
        "events: {:?}",
        events.iter().map(|(_, r, _)| r).collect::<Vec<_>>()
    );

    let ok = load
        .finish_without_failures("no request failed between 1.0 and 2.0")
        .await?;
    eprintln!("load: {ok} requests, all 200");
    watch.finish().await?;
    setup.finish().await
}

#[tokio::test]
async fn bad_canary_is_rolled_back_automatically() -> anyhow::Result<()> {
    let _shared = CONTROL_PLANE.read().await;
    let (setup, watch, load) = start_watched("ro-rollback", &[V1, V3]).await?;

    setup
        .fleet
        .patch_rollout(json!({
            "version": V3,
            "steps": [ { "setWeight": 40 }, { "analysis": {} }, { "setWeight": 100 } ],
            "analysis": analysis_spec(),
        }))
        .await?;
    let rollout = setup
        .fleet
        .wait_rollout("RolledBack", |s| {
            s.canary_version.as_deref() == Some(V3) && s.phase == Some(RolloutPhase::RolledBack)
        })
        .await?;
    let all_back = wait_all_on(&setup, &watch, V1).await?;
    let first_v3 = watch
        .first_seen(V3)
        .context("some agent served 3.0 before the rollback (the watcher saw none)")?;
    eprintln!(
        "bad_canary_is_rolled_back_automatically: first agent serving {V3} -> every agent back on \
         {V1} in {:.1}s (steps: setWeight 40, analysis, setWeight 100; analysis {ANALYSIS})",
        all_back.duration_since(first_v3).as_secs_f64()
    );
    let status = rollout.status.clone().unwrap_or_default();
    ensure!(
        status.stable_version.as_deref() == Some(V1) && status.weight == Some(0),
        "{}",
        status_json(Some(&rollout))
    );
    let analysis = status
        .last_analysis
        .as_ref()
        .context("a last analysis is recorded")?;
    ensure!(
        analysis.verdict == "Fail"
            && analysis.canary.error_rate > 0.05
            && analysis.canary.requests >= 20
            && analysis.message.contains("error rate"),
        "the last analysis failed on the error rate: {analysis:?}"
    );
    ensure!(
        status.history.iter().any(|h| h.version == V3
            && h.phase == RolloutPhase::RolledBack
            && h.from_version.as_deref() == Some(V1)),
        "the history records 3.0 RolledBack: {:?}",
        status.history
    );
    let events = setup
        .wait_events(ROLLOUT, &["RolloutStarted", "RolledBack"])
        .await?;
    let rolled_back = events
        .iter()
        .find(|(_, reason, _)| reason == "RolledBack")
        .context("a RolledBack event")?;
    ensure!(
        rolled_back.0 == "Warning" && rolled_back.2.contains("error rate"),
        "a Warning RolledBack event says why: {rolled_back:?}"
    );
    eprintln!("RolledBack event: {}", rolled_back.2);
    eprintln!("rollout timeline:\n{}", watch.timeline());

    // The canaries really answered 500 and counted it.
    let mut counted = 0u64;
    for agent in &setup.agents {
        let metrics = setup
            .fleet
            .http
            .get(format!("{}/metrics", agent.agent.url()))
            .send()
            .await?
            .text()
            .await?;
        let prefix =
            format!(r#"shoal_agent_requests_total{{model="{MODEL}",version="{V3}",code="500"}} "#);
        counted += metrics
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    let (ok, server_errors, other) = load.finish().await;
    ensure!(
        counted > 0 && server_errors > 0,
        "the 3.0 canaries answered 5xx ({server_errors} seen by the load) and counted them ({counted})"
    );
    eprintln!(
        "load: {ok} ok, {server_errors} 5xx from {V3} (agents counted {counted}), {other} other"
    );
    // Once back on 1.0 every agent answers again.
    for agent in &setup.agents {
        let status = infer_status(&setup.fleet.http, agent.agent.url(), TOKENS).await?;
        ensure!(status == 200, "{} answers 200 on 1.0: {status}", agent.node);
    }
    watch.finish().await?;
    setup.finish().await
}

#[tokio::test]
async fn restart_mid_rollout_resumes_and_waits_for_kubectl_shoal_promote() -> anyhow::Result<()> {
    let _shared = CONTROL_PLANE.read().await;
    let (mut setup, watch, load) = start_watched("ro-restart", &[V1, V2]).await?;

    setup
        .fleet
        .patch_rollout(json!({
            "version": V2,
            "steps": [ { "setWeight": 40 }, { "pause": {} }, { "setWeight": 100 } ],
        }))
        .await?;
    let paused = setup
        .wait_canary_paused_at_step_1("Paused at step index 1 (until promoted)")
        .await?;
    let canaries = setup.nodes_serving(V2).await;
    let counts: Vec<usize> = canaries.values().map(BTreeSet::len).collect();
    ensure!(
        counts == vec![2, 1],
        "at setWeight 40: 2 of 3 stores and 1 of 2 warehouses serve 2.0: {canaries:?}"
    );

    let killed = Instant::now();
    setup.fleet.operator.kill().await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    ensure!(
        setup.nodes_serving(V2).await == canaries,
        "with the operator down the agents keep serving what they served"
    );
    setup.fleet.operator.restart().await?;
    // A few reconciles of the restarted operator.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = setup.fleet.rollout().await?;
    let (before_status, after_status) = (
        paused.status.clone().unwrap_or_default(),
        after.status.clone().unwrap_or_default(),
    );
    ensure!(
        after_status.phase == Some(RolloutPhase::Paused)
            && after_status.current_step == Some(1)
            && after_status.weight == Some(40)
            && after_status
                .pools
                .iter()
                .map(|p| (&p.pool, p.updated))
                .collect::<Vec<_>>()
                == before_status
                    .pools
                    .iter()
                    .map(|p| (&p.pool, p.updated))
                    .collect::<Vec<_>>(),
        "after the restart the status still says step index 1, Paused, weight 40, same pools: \
         before {} after {}",
        status_json(Some(&paused)),
        status_json(Some(&after))
    );
    ensure!(
        setup.nodes_serving(V2).await == canaries,
        "the same agents are canaries after the restart"
    );
    let changes = watch.changes_since(killed);
    ensure!(
        changes.is_empty(),
        "no agent changed what it serves across the restart: {changes:?}"
    );

    let status_text = setup.kubectl_shoal(&["status", ROLLOUT]).await?;
    ensure!(
        status_text.contains(ROLLOUT) && status_text.contains("Paused"),
        "kubectl shoal status names the rollout and its phase:\n{status_text}"
    );
    let listed = setup
        .kubectl_shoal(&["get", "rollouts", "-o", "json"])
        .await?;
    let listed: Value = serde_json::from_str(&listed).context("get rollouts -o json is JSON")?;
    ensure!(
        listed.as_array().is_some_and(|all| all
            .iter()
            .any(|r| r["name"] == ROLLOUT && r["phase"] == "Paused")),
        "kubectl shoal get rollouts -o json lists the rollout as Paused: {listed}"
    );

    let promoted = setup.kubectl_shoal(&["promote", ROLLOUT]).await?;
    ensure!(promoted.contains("promote"), "{promoted}");
    setup
        .wait_succeeded("Succeeded at 2.0 after the promote", V2)
        .await?;
    setup.wait_all_serving(V2).await?;
    setup
        .wait_events(ROLLOUT, &["Promoted", "Succeeded"])
        .await?;

    let ok = load
        .finish_without_failures("no request failed across the restart")
        .await?;
    eprintln!("load: {ok} requests, all 200");
    watch.finish().await?;
    setup.finish().await
}

#[tokio::test]
async fn undo_returns_a_finished_rollout_to_the_previous_version() -> anyhow::Result<()> {
    let _shared = CONTROL_PLANE.read().await;
    let (setup, watch, load) = start_watched("ro-undo", &[V1, V2]).await?;

    setup
        .fleet
        .patch_rollout(json!({ "version": V2, "steps": [ { "setWeight": 50 } ] }))
        .await?;
    setup.wait_succeeded("Succeeded at 2.0", V2).await?;
    setup.wait_all_serving(V2).await?;

    let undone = setup.kubectl_shoal(&["undo", ROLLOUT]).await?;
    ensure!(undone.contains(V1), "undo says where it goes: {undone}");
    let rollout = setup.fleet.rollout().await?;
    ensure!(
        rollout.spec.version == V1,
        "undo set spec.version to {V1}: {:?}",
        rollout.spec
    );
    let rollout = setup
        .fleet
        .wait_rollout("Succeeded at 1.0 again", |s| {
            s.phase == Some(RolloutPhase::Succeeded)
                && s.canary_version.as_deref() == Some(V1)
                && s.stable_version.as_deref() == Some(V1)
        })
        .await?;
    setup.wait_all_serving(V1).await?;
    let history = rollout.status.unwrap_or_default().history;
    ensure!(
        history.iter().any(|h| h.version == V1
            && h.phase == RolloutPhase::Succeeded
            && h.from_version.as_deref() == Some(V2)),
        "the history records 1.0 Succeeded from 2.0: {history:?}"
    );

    load.finish_without_failures("no request failed").await?;
    watch.finish().await?;
    setup.finish().await
}

/// A Model published again while a rollout is paused keeps the versions the
/// rollout still uses, beyond revisionHistoryLimit: the nodes outside the canary go
/// on serving the stable version, and an abort still has it to go back to.
#[tokio::test]
async fn a_new_publish_never_trims_a_version_a_paused_rollout_still_serves() -> anyhow::Result<()> {
    let _shared = CONTROL_PLANE.read().await;
    let (setup, watch, load) = start_watched("ro-trim", &[V1, V2]).await?;
    setup
        .fleet
        .patch_rollout(json!({
            "version": V2,
            "steps": [ { "setWeight": 40 }, { "pause": {} }, { "setWeight": 100 } ],
        }))
        .await?;
    setup
        .wait_canary_paused_at_step_1("Paused at step index 1 (until promoted)")
        .await?;
    let canaries: usize = setup
        .nodes_serving(V2)
        .await
        .values()
        .map(BTreeSet::len)
        .sum();
    ensure!(
        canaries > 0 && canaries < setup.agents.len(),
        "some but not all nodes serve the canary: {:?}",
        setup.served().await
    );

    // The history now holds 1.0, 2.0 and 3.0; with a limit of 2, publishing 4.0
    // would keep only 3.0 and 4.0 if trimming ignored the rollout.
    let models = setup.fleet.api::<Model>();
    models
        .patch(
            MODEL,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": {
                "revisionHistoryLimit": 2,
                "version": "4.0",
                "source": { "configMap": { "name": CONFIG_MAP, "key": "v1" } },
            } })),
        )
        .await?;
    setup.fleet.wait_model_version("4.0").await?;
    let status = models.get(MODEL).await?.status.unwrap_or_default();
    let kept: Vec<&str> = status.versions.iter().map(|v| v.version.as_str()).collect();
    ensure!(
        kept.contains(&V1) && kept.contains(&V2) && kept.contains(&"4.0"),
        "the history keeps the stable 1.0 and the canary 2.0 beside 4.0: {kept:?}"
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        ready.contains("more than revisionHistoryLimit 2")
            && ready.contains("ModelRollouts still use"),
        "Ready says why the history is longer than the limit: {ready}"
    );

    // Several assignment polls later, the nodes outside the canary still serve 1.0.
    let stable_nodes = setup.agents.len() - canaries;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let on_stable: usize = setup
            .nodes_serving(V1)
            .await
            .values()
            .map(BTreeSet::len)
            .sum();
        ensure!(
            on_stable == stable_nodes,
            "{stable_nodes} node(s) should serve {V1} after the publish, {on_stable} do: {:?}; operator log:\n{}",
            setup.served().await,
            setup.fleet.operator.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let aborted = setup.kubectl_shoal(&["abort", ROLLOUT]).await?;
    eprintln!("kubectl shoal abort: {aborted}");
    setup
        .fleet
        .wait_rollout("Aborted back to 1.0", |s| {
            s.phase == Some(RolloutPhase::Aborted) && s.stable_version.as_deref() == Some(V1)
        })
        .await?;
    setup.wait_all_serving(V1).await?;

    load.finish_without_failures("no request failed").await?;
    watch.finish().await?;
    setup.finish().await
}

#[tokio::test]
async fn a_second_rollout_of_the_same_model_and_pool_is_refused() -> anyhow::Result<()> {
    let _shared = CONTROL_PLANE.read().await;
    let (setup, watch, load) = start_watched("ro-conflict", &[V1, V2]).await?;

    setup
        .fleet
        .patch_rollout(json!({
            "version": V2,
            "steps": [ { "setWeight": 40 }, { "pause": {} } ],
        }))
        .await?;
    setup
        .wait_canary_paused_at_step_1("Paused until promoted")
        .await?;
    let canaries = setup.nodes_serving(V2).await;

    let second = "ranker-rollout-2";
    let rollout: ModelRollout = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1", "kind": "ModelRollout",
        "metadata": { "name": second },
        "spec": { "model": MODEL, "version": V3, "pools": [STORES] },
    }))?;
    setup
        .fleet
        .api::<ModelRollout>()
        .create(&PostParams::default(), &rollout)
        .await?;
    let refused = setup
        .fleet
        .wait_named_rollout(second, "refused with Accepted=False/Conflict", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Accepted" && c.status == "False" && c.reason == "Conflict")
        })
        .await?;
    let status = refused.status.clone().unwrap_or_default();
    let accepted = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Accepted")
        .context("an Accepted condition")?;
    ensure!(
        accepted.message.contains(ROLLOUT),
        "the Conflict message names the first rollout: {accepted:?}"
    );
    ensure!(
        status.canary_version.is_none() && status.stable_version.is_none(),
        "the refused rollout plans nothing: {}",
        status_json(Some(&refused))
    );
    // Agents keep what the first rollout assigned; none gets 3.0 (the watcher).
    tokio::time::sleep(Duration::from_secs(4)).await;
    ensure!(
        setup.nodes_serving(V2).await == canaries,
        "the first rollout's canaries are unchanged"
    );
    let first = setup.fleet.rollout().await?.status.unwrap_or_default();
    ensure!(
        first.phase == Some(RolloutPhase::Paused) && first.current_step == Some(1),
        "the first rollout still holds at its pause: {first:?}"
    );

    load.finish_without_failures("no request failed").await?;
    watch.finish().await?;
    setup.finish().await
}

/// The API server and etcd go down for a few seconds in the middle of a rollout and
/// come back: the operator, never restarted, re-lists and finishes the rollout;
/// the agents serve throughout without a failed request.
#[tokio::test]
async fn api_server_and_etcd_restart_mid_rollout_and_the_operator_recovers() -> anyhow::Result<()> {
    let _alone = CONTROL_PLANE.write().await;
    let (mut setup, watch, load) = start_watched("ro-apiserver", &[V1, V2]).await?;
    let operator_pid = setup.fleet.operator.pid();
    setup
        .fleet
        .patch_rollout(json!({
            "version": V2,
            "steps": [ { "setWeight": 40 }, { "pause": { "duration": "20s" } }, { "setWeight": 100 } ],
        }))
        .await?;
    setup
        .fleet
        .wait_rollout("Paused at step index 1 (20 s)", |s| {
            s.phase == Some(RolloutPhase::Paused) && s.current_step == Some(1)
        })
        .await?;

    let down = Instant::now();
    let apiserver = stop_control_plane_process("kube-apiserver").await?;
    let etcd = stop_control_plane_process("etcd").await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    start_control_plane_process("etcd", &etcd)?;
    start_control_plane_process("kube-apiserver", &apiserver)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready =
            tokio::time::timeout(Duration::from_secs(3), setup.fleet.client.list_api_groups())
                .await
                .is_ok_and(|answer| answer.is_ok());
        if ready {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the API server did not come back within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "API server and etcd were down for {:.1}s",
        down.elapsed().as_secs_f64()
    );

    setup
        .wait_succeeded("Succeeded at 2.0 after the restart", V2)
        .await?;
    setup.wait_all_serving(V2).await?;
    ensure!(
        setup.fleet.operator.is_alive() && setup.fleet.operator.pid() == operator_pid,
        "the operator recovered without a restart of its own"
    );
    let ok = load
        .finish_without_failures("no inference failed while the control plane was down")
        .await?;
    eprintln!(
        "control plane restart: rollout Succeeded {:.1}s after the API server went down; {ok} requests, all 200",
        down.elapsed().as_secs_f64()
    );
    watch.finish().await?;
    setup.finish().await
}

/// The operator is killed at several points of one rollout (during a setWeight, a
/// timed pause and an analysis) and restarted each time: the rollout still ends
/// Succeeded, and the watcher saw no agent serve a version outside {1.0, 2.0}.
#[tokio::test]
async fn operator_killed_repeatedly_mid_rollout_stays_within_the_plan() -> anyhow::Result<()> {
    let _shared = CONTROL_PLANE.read().await;
    let (mut setup, watch, load) = start_watched("ro-kills", &[V1, V2]).await?;
    setup
        .fleet
        .patch_rollout(json!({
            "version": V2,
            "steps": [
                { "setWeight": 20 }, { "pause": { "duration": "4s" } }, { "analysis": {} },
                { "setWeight": 60 }, { "pause": { "duration": "4s" } },
            ],
            "analysis": analysis_spec(),
        }))
        .await?;
    // Kill at pseudo-random moments (fixed seed: reproducible), restart after a
    // short outage, five times.
    let mut seed: u64 = 0x5EED;
    let mut kills = Vec::new();
    for _ in 0..5 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let after = Duration::from_millis(500 + (seed >> 33) % 3000);
        tokio::time::sleep(after).await;
        let phase = setup
            .fleet
            .rollout()
            .await?
            .status
            .map(|s| format!("{:?} step {:?}", s.phase, s.current_step))
            .unwrap_or_default();
        setup.fleet.operator.kill().await?;
        tokio::time::sleep(Duration::from_millis(300 + (seed >> 40) % 1500)).await;
        setup.fleet.operator.restart().await?;
        kills.push(format!("{after:?} ({phase})"));
    }
    eprintln!("operator killed after: {}", kills.join(", "));
    setup
        .wait_succeeded("Succeeded at 2.0 despite the kills", V2)
        .await?;
    setup.wait_all_serving(V2).await?;
    load.finish_without_failures("no request failed across the kills")
        .await?;
    watch.finish().await?;
    setup.finish().await
}
