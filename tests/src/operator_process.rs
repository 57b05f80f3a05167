//! The operator as a child process of the test: `shoal-operator run` limited to one
//! namespace, with its own artifact store, metrics port and agent API port; killable
//! and restartable, with helpers that read and wait on its `/metrics`.

use crate::binaries::operator_binary;
use crate::cluster::{API_TIMEOUT, kubeconfig_path};
use crate::ports::free_port;
use crate::wait::{POLL_INTERVAL, read_log, wait_for_http_ok};
use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const OPERATOR_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Operator::wait_for_metric_line`] and
/// [`Operator::wait_for_metric_starting_with`] poll `/metrics`.
const METRIC_TIMEOUT: Duration = Duration::from_secs(60);

/// A `shoal-operator run` process limited to one namespace (or watching all), with its own artifact
/// directory, metrics port and agent API port. Call `stop()` at the end; if the test
/// ends any other way (a failed `?` or a panic), dropping it prints the operator's log.
pub struct Operator {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    /// The one namespace it watches; None watches every namespace.
    namespace: Option<String>,
    extra_args: Vec<String>,
    /// The kubeconfig it runs with (the local control plane's, or one through a proxy).
    kubeconfig: PathBuf,
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
        Self::spawn_and_wait(Some(namespace), extra_args, kubeconfig_path()).await
    }

    /// [`Operator::start_with_args`] with another kubeconfig, such as one whose
    /// server is a [`crate::stall_proxy::StallProxy`] in front of the API server.
    pub async fn start_with_kubeconfig(
        namespace: &str,
        extra_args: &[&str],
        kubeconfig: &Path,
    ) -> anyhow::Result<Operator> {
        Self::spawn_and_wait(Some(namespace), extra_args, kubeconfig.to_path_buf()).await
    }

    /// `shoal-operator run` without `--namespace`: it watches every namespace, as a
    /// production operator does. Give it `--leader-elect` on a Lease someone else
    /// holds, so that it only serves the agent API and writes nothing into the other
    /// tests' namespaces.
    pub async fn start_cluster_wide(extra_args: &[&str]) -> anyhow::Result<Operator> {
        Self::spawn_and_wait(None, extra_args, kubeconfig_path()).await
    }

    async fn spawn_and_wait(
        namespace: Option<&str>,
        extra_args: &[&str],
        kubeconfig: PathBuf,
    ) -> anyhow::Result<Operator> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-operator-")
            .tempdir()?;
        let port = free_port()?;
        let agent_api_addr = format!("127.0.0.1:{}", free_port()?);
        let extra_args: Vec<String> = extra_args.iter().map(|arg| arg.to_string()).collect();
        let child = spawn_operator(
            dir.path(),
            namespace,
            port,
            &agent_api_addr,
            &extra_args,
            &kubeconfig,
        )?;
        let mut operator = Operator {
            child,
            dir,
            namespace: namespace.map(str::to_string),
            extra_args,
            kubeconfig,
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
            self.namespace.as_deref(),
            self.metrics_port,
            &self.agent_api_addr,
            &self.extra_args,
            &self.kubeconfig,
        )?;
        self.running = true;
        self.wait_ready(self.metrics_port).await
    }

    async fn wait_ready(&mut self, port: u16) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let log = self.dir.path().join("operator.log");
        wait_for_http_ok(
            "shoal-operator",
            "it was ready",
            &mut self.child,
            &url,
            OPERATOR_READY_TIMEOUT,
            POLL_INTERVAL,
            || read_log(&log),
        )
        .await
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
        read_log(&self.dir.path().join("operator.log"))
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
    namespace: Option<&str>,
    metrics_port: u16,
    agent_api_addr: &str,
    extra_args: &[String],
    kubeconfig: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let binary = operator_binary()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("operator.log"))?;
    let mut command = tokio::process::Command::new(&binary);
    command.arg("run");
    if let Some(namespace) = namespace {
        command.args(["--namespace", namespace]);
    }
    // The tests' model files are served on loopback, which the operator refuses as
    // a Model source unless allowed; a test that sets its own networks keeps them.
    if !extra_args
        .iter()
        .any(|arg| arg.starts_with("--allow-source-network"))
    {
        command.args(["--allow-source-network", "127.0.0.0/8"]);
    }
    command
        .arg("--artifact-dir")
        .arg(dir.join("artifacts"))
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--agent-api-addr", agent_api_addr])
        // What the agent DaemonSet is told; the pods kwok fakes run no agent.
        .args(["--agent-api-url", &format!("http://{agent_api_addr}")])
        .args(extra_args)
        .env("KUBECONFIG", kubeconfig)
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
