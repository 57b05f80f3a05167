//! The processes of the local control plane (`target/cluster`) and of the real node
//! (`target/node`), which the cluster scripts record by PID file: stopped and started
//! again by the tests that take etcd, the API server or containerd away for a while.

use crate::cluster::workspace_dir;
use anyhow::Context as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

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
