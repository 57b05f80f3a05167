//! Polling until something holds: a Kubernetes object reaches a condition or is
//! gone, a child process answers 200 on a URL.

use anyhow::bail;
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::time::{Duration, Instant};

pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(250);

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

/// Polls `url` (every `pause`, for up to `timeout`) until it answers 200, failing
/// early if `child` exits. `name` (`shoal-agent`) and `up` (`it listened`) word the
/// errors, which end with `logs()`, the process's log.
pub async fn wait_for_http_ok(
    name: &str,
    up: &str,
    child: &mut tokio::process::Child,
    url: &str,
    timeout: Duration,
    pause: Duration,
    logs: impl Fn() -> String,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(exit) = child.try_wait()? {
            bail!(
                "{name} exited with {exit} before {up}; its log:\n{}",
                logs()
            );
        }
        if let Ok(response) = http.get(url).send().await
            && response.status() == reqwest::StatusCode::OK
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{name} did not answer 200 on {url} within {timeout:?}; its log:\n{}",
                logs()
            );
        }
        tokio::time::sleep(pause).await;
    }
}

/// The text of a child process's log file, or why it cannot be read.
pub fn read_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| format!("(cannot read {}: {err})", path.display()))
}
