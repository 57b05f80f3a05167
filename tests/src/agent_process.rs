//! Managed-mode `shoal-agent` processes: each with its own cache directory, token
//! file and listen port, restartable on the same cache.

use crate::binaries::agent_binary;
use crate::ports::free_port;
use crate::wait::{read_log, wait_for_http_ok};
use anyhow::Context as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// How long an agent may take to listen after it is started.
const AGENT_LIVE_TIMEOUT: Duration = Duration::from_secs(60);

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
        let child = self.child.as_mut().context("shoal-agent was not started")?;
        let log = self.dir.path().join("agent.log");
        wait_for_http_ok(
            "shoal-agent",
            "it listened",
            child,
            &url,
            AGENT_LIVE_TIMEOUT,
            Duration::from_millis(100),
            || read_log(&log),
        )
        .await
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
        read_log(&self.dir.path().join("agent.log"))
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
