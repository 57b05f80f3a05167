//! End to end: a real operator, a real `shoal-agent` in managed mode on a kwok
//! node's identity, real HTTP between them and real inference requests against
//! the agent. Two versions of a tiny scorer (v2 has every weight doubled, so its
//! scores differ) roll out through a step-less ModelRollout.
//!
//! Every test is bounded in time and in requests. The offline period of
//! `operator_down_agent_keeps_serving_and_restarts_from_cache` is
//! `$SHOAL_E2E_OFFLINE_SECONDS` (default 10; the acceptance criterion is 60).

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use shoal_tests::fleet::{
    Fleet, FleetSpec, Load, MODEL, Outcome, Relay, ensure_all_answered_by, ensure_no_failures,
    ensure_serves, serves_only, wait_serving,
};
use shoal_tests::{Agent, sha256_hex, tiny_onnx_model_scaled};
use std::time::{Duration, Instant};

const POOL: &str = "stores";
/// How long each load client waits after an answer before its next request.
const LOAD_PAUSE: Duration = Duration::from_millis(10);

fn v1_bytes() -> Vec<u8> {
    tiny_onnx_model_scaled(1.0)
}

fn v2_bytes() -> Vec<u8> {
    tiny_onnx_model_scaled(2.0)
}

/// One test's namespace, operator, kwok node and fleet: pool `stores` of one node,
/// Model `ranker` Ready at 1.0 (2.0's bytes wait in the same ConfigMap) and a
/// step-less rollout of 1.0 to the pool.
async fn start_fleet(prefix: &str) -> anyhow::Result<Fleet> {
    Fleet::start(FleetSpec {
        prefix,
        operator_args: &[],
        pools: &[(POOL, 1)],
        model_files: vec![("v1", v1_bytes()), ("v2", v2_bytes())],
        // These tests are about the agent: a version it refuses must stay assigned
        // (so it keeps retrying) rather than be rolled back, which rollout_e2e.rs
        // tests.
        auto_rollback: false,
        http_timeout: Duration::from_secs(10),
        kubeconfig: None,
    })
    .await
}

/// Starts an agent for the fleet's node against `control_plane` and waits until it
/// serves `ranker` 1.0.
async fn start_agent(fleet: &Fleet, control_plane: &str) -> anyhow::Result<Agent> {
    let agent = fleet
        .start_agent(&fleet.nodes[0].name, control_plane, &[])
        .await?;
    wait_serving(&fleet.http, &agent, "1.0").await?;
    Ok(agent)
}

#[tokio::test]
async fn swap_under_load_fails_no_request() -> anyhow::Result<()> {
    let fleet = start_fleet("e2e-swap").await?;
    let agent = start_agent(&fleet, &fleet.operator.agent_api_url()).await?;

    let load = Load::start(agent.url(), 4, LOAD_PAUSE, Duration::from_secs(120), 6000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.make_version_ready("2.0", "v2").await?;
    fleet.patch_rollout(json!({ "version": "2.0" })).await?;
    wait_serving(&fleet.http, &agent, "2.0").await?;
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
        serves_only(&fleet.http, &agent, "2.0").await,
        "the metadata lists 2.0 only"
    );
    // The agent's own counters saw no error either.
    let metrics = fleet
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
    fleet.finish().await
}

#[tokio::test]
async fn corrupt_artifact_is_refused_and_v1_keeps_serving() -> anyhow::Result<()> {
    let fleet = start_fleet("e2e-corrupt").await?;
    let relay = Relay::start(fleet.operator.agent_api_url(), &fleet.nodes[0].name, false).await?;
    let agent = start_agent(&fleet, &relay.url).await?;
    ensure_serves(&agent, "1.0", 5).await?;

    fleet.make_version_ready("2.0", "v2").await?;
    // The operator verified 2.0 when it stored it; now its blob rots on disk: same
    // length, other bytes, so what the agent downloads does not match the digest.
    let v2 = v2_bytes();
    let v2_hex = sha256_hex(&v2);
    let blob = fleet.operator.artifact_dir().join("sha256").join(&v2_hex);
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

    let load = Load::start(agent.url(), 1, LOAD_PAUSE, Duration::from_secs(90), 3000);
    fleet.patch_rollout(json!({ "version": "2.0" })).await?;
    let failed = relay.wait_for_model_state("2.0", "Failed").await?;
    let error = failed["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains(&v2_hex) && error.contains("sha256"),
        "the report says why 2.0 failed, naming the expected digest: {failed}"
    );
    // Let a few more retries of the download fail while requests keep coming.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes = load.finish().await?;
    let total = ensure_all_answered_by("1.0", "while 2.0 was refused", &outcomes)?;
    eprintln!("corrupt artifact: {total} requests, all 200 from 1.0");
    ensure!(
        serves_only(&fleet.http, &agent, "1.0").await,
        "the metadata still lists 1.0 only"
    );
    // The latest report still has 1.0 Serving beside 2.0 Failed.
    relay.wait_for_model_state("1.0", "Serving").await?;
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
    wait_serving(&fleet.http, &agent, "2.0").await?;
    ensure_serves(&agent, "2.0", 5).await?;
    relay.wait_for_model_state("2.0", "Serving").await?;

    agent.stop().await?;
    drop(relay);
    fleet.finish().await
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
    let mut fleet = start_fleet("e2e-offline").await?;
    let mut agent = start_agent(&fleet, &fleet.operator.agent_api_url()).await?;
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

    fleet.operator.kill().await?;
    let offline_for = Duration::from_secs(offline);
    let load = Load::start(
        agent.url(),
        1,
        LOAD_PAUSE,
        offline_for,
        100 * offline as usize + 100,
    );
    tokio::time::sleep(offline_for).await;
    let outcomes = load.finish().await?;
    let total = ensure_all_answered_by("1.0", "while the operator was down", &outcomes)?;
    eprintln!("operator down for {offline} s: {total} requests, all 200");

    // The agent restarts while the control plane is still unreachable: it serves
    // 1.0 from its cache as soon as it listens.
    agent.restart().await?;
    ensure!(
        serves_only(&fleet.http, &agent, "1.0").await,
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
    fleet.operator.restart().await?;
    let ns = fleet.ns().to_string();
    let connected =
        format!("shoal_fleet_agents{{namespace=\"{ns}\",pool=\"{POOL}\",state=\"connected\"}} 1");
    fleet
        .operator
        .wait_for_metric_line(&connected)
        .await
        .with_context(|| format!("the agent's log:\n{}", agent.logs()))?;
    ensure_serves(&agent, "1.0", 5).await?;
    let requests = format!(
        "shoal_fleet_requests_total{{namespace=\"{ns}\",model=\"{MODEL}\",version=\"1.0\",pool=\"{POOL}\"}} 5"
    );
    fleet
        .operator
        .wait_for_metric_line(&requests)
        .await
        .with_context(|| format!("the agent's log:\n{}", agent.logs()))?;

    agent.stop().await?;
    fleet.finish().await
}

#[tokio::test]
async fn reports_carry_no_request_payloads() -> anyhow::Result<()> {
    let fleet = start_fleet("e2e-privacy").await?;
    let relay = Relay::start(fleet.operator.agent_api_url(), &fleet.nodes[0].name, false).await?;
    let agent = start_agent(&fleet, &relay.url).await?;

    // Values no counter, histogram or timestamp would contain by chance.
    let secret_id = format!("secret-id-{}", shoal_tests::unique_name("req"));
    let secret_value: i32 = 987_654_321;
    let request = json!({
        "id": secret_id,
        "inputs": [{ "name": "tokens", "datatype": "INT32", "shape": [1, 4], "data": [secret_value, 7, 11, 13] }],
    });
    let response = fleet
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
    relay
        .wait_for_model("the request counted", |model| {
            model["name"] == MODEL && model["requests"].as_u64().is_some_and(|n| n >= 1)
        })
        .await?;
    let reports = relay.reports()?;
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
    drop(relay);
    fleet.finish().await
}

fn collect_numbers(value: &Value, out: &mut Vec<f64>) {
    match value {
        Value::Number(number) => out.extend(number.as_f64()),
        Value::Array(items) => items.iter().for_each(|item| collect_numbers(item, out)),
        Value::Object(fields) => fields.values().for_each(|item| collect_numbers(item, out)),
        _ => {}
    }
}
