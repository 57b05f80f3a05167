//! `make bench-fleet`: Shoal at fleet scale against the local control plane.
//!
//! Creates `FLEET_NODES` kwok nodes (default 2,000) in `FLEET_POOLS` EdgePools
//! (default 20); the DaemonSet controller gives each a (kwok) agent pod, and every
//! node gets a simulated agent that speaks the real agent protocol — long-poll with
//! ETag, reports with cumulative counters, authenticated with a token bound to its
//! pod — without loading models, all in this one process; `FLEET_REAL_AGENTS`
//! (default 3) nodes get a real `shoal-agent` process instead. Then a ModelRollout
//! moves the fleet 1.0 → 2.0 through setWeight 10 → analysis → 50 → analysis → 100
//! and the benchmark prints the figures Shoal has targets for: time to 100 % after the last
//! gate passed, operator RSS and CPU, reports ingested per second, API-server writes
//! per minute to Shoal's objects, long-polls held. It never fails on timing; it
//! stops itself (every wait is bounded) and deletes what it created.

use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use shoal_api::agent_protocol::{
    AgentReport, Assignment, LatencyBucket, ModelReport, ModelState, assignment_path, report_path,
};
use shoal_api::{EdgePool, Model, ModelRollout, RolloutPhase};
use shoal_tests::{
    Agent, KWOK_NODE_KEY, Operator, TestNamespace, client, create_kwok_node, delete_nodes,
    install_crds, pod_token, tiny_onnx_model, tiny_onnx_model_scaled,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MODEL: &str = "ranker";
const ROLLOUT: &str = "ranker";
const POOL_LABEL: &str = "shoal.dev/fleet-pool";
/// Simulated agents report this often (the real agent's default is 15 s).
const REPORT_EVERY: Duration = Duration::from_secs(15);
const LONG_POLL_SECONDS: u64 = 30;
/// Requests per second each simulated agent claims to serve.
const SIMULATED_RPS: u64 = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the simulated fleet serves now, by node.
#[derive(Default)]
struct FleetState {
    serving: Mutex<HashMap<String, String>>,
    reports_sent: AtomicU64,
    reports_refused: AtomicU64,
    polls_answered: AtomicU64,
    stop: AtomicBool,
}

impl FleetState {
    fn count(&self, version: &str) -> usize {
        lock(&self.serving)
            .values()
            .filter(|v| v.as_str() == version)
            .count()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let nodes_wanted = env_usize("FLEET_NODES", 2000);
    let pools_wanted = env_usize("FLEET_POOLS", 20).max(1);
    let real_agents = env_usize("FLEET_REAL_AGENTS", 3).min(nodes_wanted);
    let started = Instant::now();
    let client = client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "fleet").await?;
    let ns = namespace.name().to_string();
    let result = run(
        &client,
        &ns,
        nodes_wanted,
        pools_wanted,
        real_agents,
        started,
    )
    .await;
    eprintln!("cleaning up: nodes and namespace {ns}");
    let nodes: Vec<String> = (0..nodes_wanted).map(|i| node_name(&ns, i)).collect();
    let _ = delete_nodes(&client, &nodes).await;
    let _ = namespace.delete().await;
    result
}

fn node_name(ns: &str, i: usize) -> String {
    format!("{ns}-n{i:05}")
}

fn pool_of(i: usize, pools: usize) -> String {
    format!("p{:02}", i % pools)
}

async fn run(
    client: &Client,
    ns: &str,
    nodes_wanted: usize,
    pools: usize,
    real_agents: usize,
    started: Instant,
) -> anyhow::Result<()> {
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
    let operator = Operator::start_with_args(ns, &["--agent-stale-after", "120s"]).await?;
    let operator_pid = operator.pid().context("operator pid")?;

    step(&format!(
        "creating {nodes_wanted} kwok nodes in {pools} pools"
    ));
    stream::iter(0..nodes_wanted)
        .map(|i| {
            let client = client.clone();
            let pool = pool_of(i, pools);
            let name = node_name(ns, i);
            let ns = ns.to_string();
            async move {
                create_kwok_node(
                    &client,
                    &name,
                    &[
                        (POOL_LABEL, pool.as_str()),
                        ("shoal.dev/fleet", ns.as_str()),
                    ],
                )
                .await
                .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;

    step("model 1.0 and 2.0, EdgePools, rollout of 1.0");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "ranker" },
                "binaryData": {
                    "v1": ByteString(tiny_onnx_model()), "v2": ByteString(tiny_onnx_model_scaled(2.0)),
                },
            }))?,
        )
        .await?;
    let models: Api<Model> = Api::namespaced(client.clone(), ns);
    models
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "Model", "metadata": { "name": MODEL },
                "spec": { "version": "1.0", "source": { "configMap": { "name": "ranker", "key": "v1" } } },
            }))?,
        )
        .await?;
    let pool_api: Api<EdgePool> = Api::namespaced(client.clone(), ns);
    let pool_names: Vec<String> = (0..pools).map(|p| format!("p{p:02}")).collect();
    for pool in &pool_names {
        pool_api
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "shoal.dev/v1alpha1", "kind": "EdgePool", "metadata": { "name": pool },
                    "spec": {
                        "nodeSelector": { "matchLabels": { POOL_LABEL: pool, "shoal.dev/fleet": ns } },
                        "tolerations": [{ "key": KWOK_NODE_KEY, "operator": "Exists", "effect": "NoSchedule" }],
                    },
                }))?,
            )
            .await?;
    }
    wait("Model 1.0 Ready", Duration::from_secs(120), || async {
        Ok(models
            .get(MODEL)
            .await?
            .status
            .is_some_and(|s| s.versions.iter().any(|v| v.version == "1.0")))
    })
    .await?;
    let rollouts: Api<ModelRollout> = Api::namespaced(client.clone(), ns);
    rollouts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "shoal.dev/v1alpha1", "kind": "ModelRollout", "metadata": { "name": ROLLOUT },
                "spec": { "model": MODEL, "version": "1.0", "pools": pool_names },
            }))?,
        )
        .await?;

    step("waiting for an agent pod on every node (DaemonSets, kwok)");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut pod_of: HashMap<String, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while pod_of.len() < nodes_wanted {
        pod_of = pods
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|pod| Some((pod.spec?.node_name?, pod.metadata.name?)))
            .collect();
        if Instant::now() > deadline {
            bail!(
                "only {} of {nodes_wanted} agent pods after 10 minutes",
                pod_of.len()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    step("pod-bound tokens for every agent");
    let tokens: HashMap<String, String> = stream::iter(0..nodes_wanted)
        .map(|i| {
            let client = client.clone();
            let node = node_name(ns, i);
            let pod = pod_of[&node].clone();
            let account = format!("shoal-agent-{}", pool_of(i, pools));
            let ns = ns.to_string();
            async move {
                let token = pod_token(&client, &ns, &account, &pod, "shoal").await?;
                anyhow::Ok((node, token))
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;

    step(&format!(
        "{} simulated agents and {real_agents} real shoal-agent processes",
        nodes_wanted - real_agents
    ));
    let state = Arc::new(FleetState::default());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(nodes_wanted + 16)
        .timeout(Duration::from_secs(LONG_POLL_SECONDS + 15))
        .build()?;
    let base = operator.agent_api_url();
    let mut tasks = Vec::new();
    for i in real_agents..nodes_wanted {
        let node = node_name(ns, i);
        let token = tokens[&node].clone();
        tasks.push(tokio::spawn(simulated_agent(
            http.clone(),
            base.clone(),
            node,
            token,
            state.clone(),
        )));
    }
    let mut real = Vec::new();
    for i in 0..real_agents {
        let node = node_name(ns, i);
        real.push(Agent::start(&base, &node, &tokens[&node], &["--report-seconds", "5"]).await?);
    }
    let real_http = reqwest::Client::new();
    let real_serving = |version: &'static str| {
        let urls: Vec<String> = real.iter().map(|a| a.url().to_string()).collect();
        let http = real_http.clone();
        async move {
            let mut count = 0;
            for url in urls {
                let served = http
                    .get(format!("{url}/v2/models/{MODEL}"))
                    .send()
                    .await
                    .ok()
                    .and_then(|r| r.status().is_success().then_some(r));
                if let Some(response) = served
                    && let Ok(body) = response.bytes().await
                    && let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&body)
                    && meta["versions"] == json!([version])
                {
                    count += 1;
                }
            }
            count
        }
    };

    let all_on = |version: &'static str| {
        let state = state.clone();
        async move { state.count(version) + real_serving(version).await }
    };
    wait(
        "every agent on 1.0",
        Duration::from_secs(600),
        || async move { Ok(all_on("1.0").await == nodes_wanted) },
    )
    .await?;
    step("the whole fleet serves 1.0; publishing 2.0");
    models
        .patch(
            MODEL,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "version": "2.0", "source": { "configMap": { "name": "ranker", "key": "v2" } } } })),
        )
        .await?;
    wait("Model 2.0 Ready", Duration::from_secs(120), || async {
        Ok(models
            .get(MODEL)
            .await?
            .status
            .is_some_and(|s| s.versions.iter().any(|v| v.version == "2.0")))
    })
    .await?;
    // Let one report cycle pass so that the stable cohort has figures.
    tokio::time::sleep(REPORT_EVERY).await;

    let api_writes_before = api_writes(client).await.unwrap_or_default();
    let reports_before = state.reports_sent.load(Ordering::Relaxed);
    let cpu_before = cpu_seconds(operator_pid).unwrap_or(0.0);
    let patched = Instant::now();
    step("rolling out 2.0: setWeight 10 → analysis → 50 → analysis → 100");
    rollouts
        .patch(
            ROLLOUT,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": {
                "version": "2.0",
                "steps": [ { "setWeight": 10 }, { "analysis": {} }, { "setWeight": 50 }, { "analysis": {} } ],
                "analysis": { "interval": "20s", "minRequests": 50, "maxErrorRate": 0.01 },
                "maxUnavailable": "100%",
            } })),
        )
        .await?;
    // The last gate passed between the last poll that saw an earlier step and the
    // first that saw the final one; timing from the former gives an upper bound.
    let mut last_gate: Option<Instant> = None;
    let mut before_gate = Instant::now();
    let mut peak_rss = 0u64;
    let mut peak_polls = 0.0f64;
    let mut timeline = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    let everyone = loop {
        let polled = Instant::now();
        let status = rollouts.get(ROLLOUT).await?.status.unwrap_or_default();
        let entry = format!(
            "{:?} step {:?} weight {:?}",
            status.phase, status.current_step, status.weight
        );
        if timeline.last().map(|(_, e): &(f64, String)| e) != Some(&entry) {
            eprintln!("[{:>6.1}s] {entry}", patched.elapsed().as_secs_f64());
            timeline.push((patched.elapsed().as_secs_f64(), entry));
        }
        // The last gate: the step machine leaving the last analysis step.
        if status.current_step.unwrap_or(0) < 4 {
            before_gate = polled;
        } else if last_gate.is_none() {
            last_gate = Some(before_gate);
        }
        peak_rss = peak_rss.max(rss_kib(operator_pid).unwrap_or(0));
        if let Ok(metrics) = operator.metrics().await {
            peak_polls = peak_polls.max(metric(&metrics, "shoal_agent_api_long_polls_in_flight"));
        }
        if all_on("2.0").await == nodes_wanted {
            break Instant::now();
        }
        if status.phase == Some(RolloutPhase::RolledBack) {
            bail!("the rollout rolled back: {:?}", status.last_analysis);
        }
        if Instant::now() > deadline {
            bail!("the fleet did not reach 2.0 within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let window = patched.elapsed();
    let cpu = cpu_seconds(operator_pid).unwrap_or(0.0) - cpu_before;
    let writes_by_kind = writes_between(
        &api_writes_before,
        &api_writes(client).await.unwrap_or_default(),
    );
    let writes: f64 = writes_by_kind.values().sum();
    let shoal_writes: f64 = writes_by_kind
        .iter()
        .filter(|(key, _)| {
            ["models", "edgepools", "modelrollouts"]
                .iter()
                .any(|r| key.starts_with(r))
        })
        .map(|(_, n)| n)
        .sum();
    let per_minute = |n: f64| n / window.as_secs_f64() * 60.0;
    let breakdown = writes_by_kind
        .iter()
        .map(|(key, n)| format!("{key} {:.1}", per_minute(*n)))
        .collect::<Vec<_>>()
        .join(", ");
    let reports = state.reports_sent.load(Ordering::Relaxed) - reports_before;
    let after_gate = last_gate.map(|g| everyone.saturating_duration_since(g));
    let rss_now = rss_kib(operator_pid).unwrap_or(0);
    state.stop.store(true, Ordering::Relaxed);

    let table = format!(
        "## Fleet benchmark: {nodes_wanted} nodes, {pools} pools ({} simulated agents, {real_agents} real)\n\n\
         Rollout 1.0 → 2.0, steps setWeight 10 → analysis → setWeight 50 → analysis → 100 \
         (analysis interval 20 s, minRequests 50), maxUnavailable 100%; simulated agents \
         report every {}s and long-poll {}s. Operator: `{}`. 2 shared cores.\n\n\
         | what | measured | target |\n| --- | ---: | --- |\n\
         | version change → 100% of agents on 2.0 | {:.1} s | – |\n\
         | last gate passed → 100% of agents on 2.0 (upper bound: status polled every 0.5 s) | ≤ {} | ≤ 60 s |\n\
         | operator RSS (peak during the rollout / after) | {:.1} MB / {:.1} MB | ≤ 150 MB |\n\
         | operator CPU during the rollout | {:.1} s of CPU in {:.1} s ({:.0}% of one core) | – |\n\
         | reports ingested | {:.1} /s ({} refused) | – |\n\
         | API writes by the operator (all / to shoal.dev objects) | {:.1} /min / {:.1} /min | coalesced, not per report |\n\
         | long-polls held (peak) | {:.0} | one per agent |\n",
        nodes_wanted - real_agents,
        REPORT_EVERY.as_secs(),
        LONG_POLL_SECONDS,
        std::env::var("SHOAL_OPERATOR_BIN")
            .unwrap_or_else(|_| "target/debug/shoal-operator".into()),
        window.as_secs_f64(),
        after_gate.map_or("n/a".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        peak_rss as f64 / 1024.0,
        rss_now as f64 / 1024.0,
        cpu,
        window.as_secs_f64(),
        cpu / window.as_secs_f64() * 100.0,
        reports as f64 / window.as_secs_f64(),
        state.reports_refused.load(Ordering::Relaxed),
        per_minute(writes),
        per_minute(shoal_writes),
        peak_polls,
    );
    let table = format!("{table}\nAPI writes per minute by resource and verb: {breakdown}.\n");
    println!("{table}");
    let _ = std::fs::create_dir_all("target/bench");
    let _ = std::fs::write("target/bench/fleet.md", &table);
    for task in tasks {
        task.abort();
    }
    for agent in real {
        let _ = agent.stop().await;
    }
    let _ = operator.stop().await;
    Ok(())
}

/// One simulated agent: long-polls its assignment and "serves" what it is told at
/// once (no download, no model), and reports cumulative counters every REPORT_EVERY.
async fn simulated_agent(
    http: reqwest::Client,
    base: String,
    node: String,
    token: String,
    state: Arc<FleetState>,
) {
    let started = Instant::now();
    let start_time = k8s_openapi::jiff::Timestamp::now().to_string();
    // Spread the reports over the interval, like agents started at different times.
    let offset = Duration::from_millis(
        u64::from(
            node.bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))),
        ) % REPORT_EVERY.as_millis() as u64,
    );
    let mut next_report = Instant::now() + offset;
    let mut etag: Option<String> = None;
    let mut serving: Option<(String, String)> = None; // (model, version)
    let mut since_version = Instant::now();
    while !state.stop.load(Ordering::Relaxed) {
        let wait = next_report
            .saturating_duration_since(Instant::now())
            .as_secs()
            .clamp(1, LONG_POLL_SECONDS);
        let mut request = http
            .get(format!(
                "{base}{}?waitSeconds={wait}",
                assignment_path(&node)
            ))
            .bearer_auth(&token);
        if let Some(tag) = &etag {
            request = request.header("If-None-Match", tag);
        }
        match request.send().await {
            Ok(response) if response.status() == reqwest::StatusCode::OK => {
                etag = response
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if let Ok(body) = response.bytes().await
                    && let Ok(assignment) = serde_json::from_slice::<Assignment>(&body)
                    && let Some(model) = assignment.models.first()
                {
                    if serving.as_ref().map(|(_, v)| v) != Some(&model.version) {
                        since_version = Instant::now();
                    }
                    serving = Some((model.name.clone(), model.version.clone()));
                    lock(&state.serving).insert(node.clone(), model.version.clone());
                }
                state.polls_answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
        if Instant::now() >= next_report {
            next_report += REPORT_EVERY;
            let models = serving
                .iter()
                .map(|(name, version)| {
                    let requests = since_version.elapsed().as_secs() * SIMULATED_RPS;
                    ModelReport {
                        name: name.clone(),
                        version: version.clone(),
                        state: ModelState::Serving,
                        error: None,
                        requests,
                        errors: 0,
                        latency_buckets: vec![
                            LatencyBucket {
                                le_ms: 5.0,
                                count: requests,
                            },
                            LatencyBucket {
                                le_ms: 10.0,
                                count: requests,
                            },
                        ],
                        latency_sum_ms: requests as f64 * 3.0,
                    }
                })
                .collect();
            let report = AgentReport {
                node: node.clone(),
                agent_start_time: start_time.clone(),
                agent_version: format!("fleet-sim (up {}s)", started.elapsed().as_secs()),
                models,
            };
            match http
                .post(format!("{base}{}", report_path(&node)))
                .bearer_auth(&token)
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(&report).unwrap_or_default())
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => {
                    state.reports_sent.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    state.reports_refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn wait<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The API server's write requests (POST, PUT, PATCH, APPLY, DELETE) to what the
/// operator writes, by "resource[/subresource] VERB": shoal.dev objects, the agents'
/// DaemonSets, ServiceAccounts and CA ConfigMaps (not their status: the
/// controller-manager writes that), and Events. The operator is the only writer of
/// these in the benchmark.
async fn api_writes(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut writes = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            // `,resource="` must not match `subresource="`.
            let start = [format!("{{{name}=\""), format!(",{name}=\"")]
                .iter()
                .find_map(|pattern| Some(line.find(pattern.as_str())? + pattern.len()))?;
            let end = start + line[start..].find('"')?;
            Some(&line[start..end])
        };
        let (Some(group), Some(resource), Some(verb)) =
            (label("group"), label("resource"), label("verb"))
        else {
            continue;
        };
        let subresource = label("subresource").unwrap_or("");
        let operators = group == "shoal.dev"
            || (group == "apps" && resource == "daemonsets" && subresource.is_empty())
            || (group.is_empty()
                && ["serviceaccounts", "configmaps"].contains(&resource)
                && subresource.is_empty())
            || (group == "events.k8s.io" && resource == "events");
        if !operators || !["POST", "PUT", "PATCH", "APPLY", "DELETE"].contains(&verb) {
            continue;
        }
        let Some(count) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let key = if subresource.is_empty() {
            format!("{resource} {verb}")
        } else {
            format!("{resource}/{subresource} {verb}")
        };
        *writes.entry(key).or_insert(0.0) += count;
    }
    Ok(writes)
}

/// Per key, `after - before`, keeping the keys that grew.
fn writes_between(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(key, n)| (key.clone(), n - before.get(key).copied().unwrap_or(0.0)))
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds of a process (clock ticks of 1/100 s on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
