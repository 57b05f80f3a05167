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
use serde_json::json;
use shoal_tests::fleet::{
    Fleet, FleetSpec, Load, Relay, WAIT, ensure_all_answered_by, ensure_serves, infer,
    served_versions, serves_only, wait_serving,
};
use shoal_tests::{Agent, sha256_hex, tiny_onnx_model_padded, tiny_onnx_model_scaled};
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::time::{Duration, Instant};

const POOL: &str = "stores";
/// How long the load client waits after an answer before its next request.
const LOAD_PAUSE: Duration = Duration::from_millis(20);

fn v1_bytes() -> Vec<u8> {
    tiny_onnx_model_scaled(1.0)
}

/// One test's namespace, operator, kwok node and fleet: pool `stores` of one node,
/// Model `ranker` Ready at 1.0 (`v2`'s bytes wait in the same ConfigMap) and a
/// step-less rollout of 1.0 to the pool without automatic rollback.
async fn start_fleet(prefix: &str, v2: &[u8]) -> anyhow::Result<Fleet> {
    Fleet::start(FleetSpec {
        prefix,
        operator_args: &[],
        pools: &[(POOL, 1)],
        model_files: vec![("v1", v1_bytes()), ("v2", v2.to_vec())],
        // A version the agent cannot take must stay assigned, not be rolled back.
        auto_rollback: false,
        http_timeout: Duration::from_secs(10),
        kubeconfig: None,
    })
    .await
}

/// Starts an agent for the fleet's node against `control_plane` with `extra_args`
/// and waits until it serves `ranker` 1.0.
async fn start_agent(
    fleet: &Fleet,
    control_plane: &str,
    extra_args: &[&str],
) -> anyhow::Result<Agent> {
    let agent = fleet
        .start_agent(&fleet.nodes[0].name, control_plane, extra_args)
        .await?;
    wait_serving(&fleet.http, &agent, "1.0").await?;
    Ok(agent)
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
    let fleet = start_fleet("faults-cache-full", &v2).await?;
    let relay = Relay::start(fleet.operator.agent_api_url(), &fleet.nodes[0].name, false).await?;
    // Room for 1.0 and a few bytes more: 2.0 (as big as 1.0) cannot fit beside it.
    let cache_size = (v1.len() + 16).to_string();
    let agent = start_agent(&fleet, &relay.url, &["--cache-size", cache_size.as_str()]).await?;
    ensure_serves(&agent, "1.0", 5).await?;

    fleet.make_version_ready("2.0", "v2").await?;
    let load = Load::start(agent.url(), 1, LOAD_PAUSE, Duration::from_secs(90), 3000);
    fleet.patch_rollout(json!({ "version": "2.0" })).await?;
    let failed = relay.wait_for_model_state("2.0", "Failed").await?;
    let error = failed["error"].as_str().unwrap_or_default();
    eprintln!("cache full: the agent reports 2.0 Failed: {error}");
    ensure!(
        error.contains("no room") && error.contains("cacheSize"),
        "the report says the cache is too small and what to raise: {failed}"
    );
    // A few more retries fail while requests keep coming.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes = load.finish().await?;
    let total = ensure_all_answered_by("1.0", "while 2.0 did not fit", &outcomes)?;
    eprintln!("cache full: {total} requests while 2.0 was refused, all 200 from 1.0");
    ensure!(
        serves_only(&fleet.http, &agent, "1.0").await,
        "the metadata still lists 1.0 only"
    );
    relay.wait_for_model_state("1.0", "Serving").await?;
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
    fleet.finish().await
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
    let fleet = start_fleet("faults-kill-swap", &v2).await?;
    let relay = Relay::start(fleet.operator.agent_api_url(), &fleet.nodes[0].name, true).await?;
    let mut agent = start_agent(&fleet, &relay.url, &[]).await?;
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

    fleet.make_version_ready("2.0", "v2").await?;
    fleet.patch_rollout(json!({ "version": "2.0" })).await?;
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
        let versions = served_versions(&fleet.http, agent.url())
            .await
            .ok()
            .flatten()
            .context("the restarted agent serves ranker at once")?;
        let version = match versions.as_slice() {
            [version] if version == "1.0" || version == "2.0" => version.clone(),
            _ => bail!("the restarted agent lists {versions:?}"),
        };
        let outcome = infer(&fleet.http, agent.url()).await;
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
    wait_serving(&fleet.http, &agent, "2.0").await?;
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
    relay.wait_for_model_state("2.0", "Serving").await?;

    agent.stop().await?;
    drop(relay);
    fleet.finish().await
}
