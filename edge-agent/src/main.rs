//! The `shoal-agent` command. Standalone mode serves local ONNX files
//! (`--model NAME=PATH`) with no control plane; every model is loaded and warmed
//! up before the server listens. Managed mode (`--control-plane URL --node NAME
//! --cache-dir DIR`) serves what the operator assigns to the node, starting from
//! the cached last-known-good assignment so it serves even while offline.
//! `shoal-agent prepare-cache --dir DIR --owner UID:GID` is the agent DaemonSet's
//! init container: it gives the hostPath cache directory to the agent's user.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;

use shoal_agent::cache::Cache;
use shoal_agent::control_plane::ControlPlane;
use shoal_agent::metrics::Metrics;
use shoal_agent::prepare_cache::{self, Owner, Prepared};
use shoal_agent::registry::ModelRegistry;
use shoal_agent::server::{self, AppState, Limits};
use shoal_agent::supervise::{RESTART_DELAY, restart_on_panic};
use shoal_agent::sync::Syncer;

#[derive(Debug, Parser)]
#[command(
    name = "shoal-agent",
    version,
    about = "Serves ONNX models over the Open Inference Protocol v2",
    // `prepare-cache` takes none of the serving flags, and needs neither --model
    // nor --control-plane.
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// A model to serve from a local file: NAME=PATH, or NAME:VERSION=PATH
    /// (version "1" when not given). Repeat for more models.
    #[arg(
        long = "model",
        value_name = "NAME[:VERSION]=PATH",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane",
        value_parser = parse_model_arg
    )]
    models: Vec<ModelArg>,

    /// Managed mode: URL of the operator's agent API (https:// in production).
    #[arg(long, env = "SHOAL_CONTROL_PLANE", requires_all = ["node", "cache_dir"])]
    control_plane: Option<String>,

    /// Managed mode: the Kubernetes node this agent serves (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,

    /// Managed mode: directory for artifacts and the last-known-good assignment;
    /// keep it across restarts (a hostPath on the edge node).
    #[arg(long, env = "SHOAL_AGENT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Managed mode: most bytes the artifact cache may hold (512Mi, 2Gi, …).
    #[arg(long, env = "SHOAL_AGENT_CACHE_SIZE", default_value = "2Gi", value_parser = shoal_agent::cache::parse_size)]
    cache_size: u64,

    /// Managed mode: the projected service-account token (audience "shoal") sent
    /// to the operator; read before every call because the kubelet rotates it.
    #[arg(long, env = "SHOAL_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// Managed mode: PEM CA that signed the operator's serving certificate.
    #[arg(long, env = "SHOAL_AGENT_CONTROL_PLANE_CA")]
    control_plane_ca: Option<PathBuf>,

    /// Managed mode: seconds between two reports to the operator.
    #[arg(long, env = "SHOAL_AGENT_REPORT_SECONDS", default_value_t = 15)]
    report_seconds: u64,

    /// Address to listen on.
    #[arg(long, env = "SHOAL_AGENT_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,

    /// Inference requests that run at once; inference is single-threaded per
    /// request, so the default is the number of cores.
    #[arg(long, env = "SHOAL_AGENT_WORKERS")]
    workers: Option<usize>,

    /// Requests that may wait for a worker; beyond that the agent answers 429.
    /// With the body limit this bounds the memory requests can take.
    #[arg(long, env = "SHOAL_AGENT_QUEUE", default_value_t = 32)]
    queue: usize,

    /// Largest inference request body, in bytes; larger ones get 413.
    #[arg(long, env = "SHOAL_AGENT_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_body_bytes: usize,

    /// Largest batch an inference request may send: the size of an input's first
    /// dimension when the model leaves it open. Larger ones get 400 before any
    /// plan is built, because tract's plan for a batch takes memory in proportion
    /// to it even when the request holds no data (a zero in another dimension).
    #[arg(long, env = "SHOAL_AGENT_MAX_BATCH", default_value_t = shoal_agent::validation::DEFAULT_MAX_BATCH)]
    max_batch: usize,

    /// Seconds from receiving an inference request to answering it, queueing
    /// included; past that the agent answers 503.
    #[arg(
        long,
        env = "SHOAL_AGENT_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 30.0
    )]
    request_timeout_seconds: f64,

    /// Seconds a client has to send an inference request's body once its
    /// headers arrived; past that the agent answers 408. A trickling body
    /// otherwise holds a queue slot until the request timeout. 20 s lets a
    /// 16 MiB body through a link of 7 Mbit/s.
    #[arg(
        long,
        env = "SHOAL_AGENT_BODY_READ_TIMEOUT_SECONDS",
        default_value_t = 20.0
    )]
    body_read_timeout_seconds: f64,

    /// Seconds a client has to send a request's headers (from connecting, or
    /// from the end of its previous request on a kept-alive connection); past
    /// that the agent closes the connection. Bounds what slowloris clients and
    /// idle connections hold.
    #[arg(
        long,
        env = "SHOAL_AGENT_HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = 10.0
    )]
    header_read_timeout_seconds: f64,

    /// Log format.
    #[arg(long, env = "SHOAL_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Commands other than serving (which is what runs without one).
#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the cache directory if missing and makes UID:GID its owner (that
    /// directory only, not its content), then exits. The agent DaemonSet runs it
    /// in an init container as uid 0 with only the CHOWN capability, because the
    /// kubelet creates a hostPath directory as root and the agent runs as 65532.
    PrepareCache {
        /// The cache directory, as mounted in the container.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Numeric owner to give it, for example 65532:65532.
        #[arg(long, value_name = "UID:GID")]
        owner: Owner,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
struct ModelArg {
    name: String,
    version: String,
    path: PathBuf,
}

fn parse_model_arg(text: &str) -> Result<ModelArg, String> {
    let Some((id, path)) = text.split_once('=') else {
        return Err("expected NAME=PATH or NAME:VERSION=PATH".to_string());
    };
    let (name, version) = id.split_once(':').unwrap_or((id, "1"));
    if name.is_empty() || version.is_empty() || path.is_empty() {
        return Err("expected NAME=PATH or NAME:VERSION=PATH, none of them empty".to_string());
    }
    // Names and versions become URL path segments.
    if name.contains('/') || version.contains('/') {
        return Err("a model name or version cannot contain '/'".to_string());
    }
    Ok(ModelArg {
        name: name.to_string(),
        version: version.to_string(),
        path: PathBuf::from(path),
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    if let Some(Command::PrepareCache { dir, owner }) = &args.command {
        return prepare_cache_dir(dir, *owner);
    }

    let workers = match args.workers {
        Some(0) => bail!("--workers must be at least 1"),
        Some(workers) => workers,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if !(args.request_timeout_seconds.is_finite() && args.request_timeout_seconds > 0.0) {
        bail!("--request-timeout-seconds must be a positive number");
    }
    if !(args.body_read_timeout_seconds.is_finite() && args.body_read_timeout_seconds > 0.0) {
        bail!("--body-read-timeout-seconds must be a positive number");
    }
    if !(args.header_read_timeout_seconds.is_finite() && args.header_read_timeout_seconds > 0.0) {
        bail!("--header-read-timeout-seconds must be a positive number");
    }
    let limits = Limits {
        workers,
        queue: args.queue,
        max_body_bytes: args.max_body_bytes,
        max_batch: args.max_batch,
        request_timeout: Duration::from_secs_f64(args.request_timeout_seconds),
        body_read_timeout: Duration::from_secs_f64(args.body_read_timeout_seconds),
        header_read_timeout: Duration::from_secs_f64(args.header_read_timeout_seconds),
    };

    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(ModelRegistry::new(metrics.clone()));
    for model in &args.models {
        if registry.get(&model.name).is_some() {
            bail!("model {:?} is given twice", model.name);
        }
        let bytes = tokio::fs::read(&model.path).await.with_context(|| {
            format!(
                "reading model {:?} from {}",
                model.name,
                model.path.display()
            )
        })?;
        let loader = registry.clone();
        let (name, version) = (model.name.clone(), model.version.clone());
        let loaded =
            tokio::task::spawn_blocking(move || loader.load_version(&name, &version, &bytes))
                .await
                .context("the model loader thread failed")?
                .with_context(|| {
                    format!(
                        "loading model {:?} from {}",
                        model.name,
                        model.path.display()
                    )
                })?;
        registry.swap(loaded);
    }

    let syncer = match &args.control_plane {
        None => None,
        Some(url) => Some(start_managed(url, &args, registry.clone()).await?),
    };

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr().context("reading the bound address")?;
    tracing::info!(
        address = %address,
        workers = limits.workers,
        queue = limits.queue,
        max_body_bytes = limits.max_body_bytes,
        "listening"
    );
    let state = AppState::new(registry, metrics, limits);
    if let Some(syncer) = syncer {
        let sync = syncer.clone();
        tokio::spawn(restart_on_panic("sync", RESTART_DELAY, move || {
            sync.clone().run()
        }));
        let every = Duration::from_secs(args.report_seconds.max(1));
        tokio::spawn(restart_on_panic("report", RESTART_DELAY, move || {
            syncer.clone().report_every(every)
        }));
    }
    server::serve(listener, state, shutdown_signal())
        .await
        .context("serving HTTP")?;
    tracing::info!("stopped");
    Ok(())
}

fn prepare_cache_dir(dir: &std::path::Path, owner: Owner) -> anyhow::Result<()> {
    match prepare_cache::prepare(dir, owner)? {
        Prepared::AlreadyOwned => {
            tracing::info!(dir = %dir.display(), %owner, "cache directory already owned")
        }
        Prepared::Chowned { from } => {
            tracing::info!(dir = %dir.display(), %from, to = %owner, "cache directory owner changed")
        }
    }
    Ok(())
}

/// Opens the cache and serves its last-known-good assignment before any network
/// call, so an agent restarted while the WAN is down serves at once.
async fn start_managed(
    url: &str,
    args: &Args,
    registry: Arc<ModelRegistry>,
) -> anyhow::Result<Arc<Syncer>> {
    let node = args
        .node
        .as_deref()
        .context("--node is required with --control-plane")?;
    let cache_dir = args
        .cache_dir
        .as_ref()
        .context("--cache-dir is required with --control-plane")?;
    let cache = Cache::open(cache_dir)
        .with_context(|| format!("opening the cache at {}", cache_dir.display()))?;
    let control_plane = ControlPlane::new(
        url,
        node,
        args.token_file.clone(),
        args.control_plane_ca.clone(),
    )
    .context("configuring the control-plane client")?;
    let started_at = jiff::Timestamp::now().to_string();
    let syncer = Arc::new(Syncer::new(
        registry,
        cache,
        control_plane,
        node,
        started_at,
        args.cache_size,
    ));
    syncer.serve_last_known_good().await;
    tracing::info!(control_plane = url, node, "managed mode");
    Ok(syncer)
}

/// Completes on SIGTERM (how the kubelet stops a pod) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_args() {
        let plain = parse_model_arg("magika=/m/model.onnx").expect("valid");
        assert_eq!(
            (plain.name.as_str(), plain.version.as_str()),
            ("magika", "1")
        );
        assert_eq!(plain.path, PathBuf::from("/m/model.onnx"));
        let versioned = parse_model_arg("magika:1.0.3=m.onnx").expect("valid");
        assert_eq!(versioned.version, "1.0.3");
        assert!(parse_model_arg("magika").is_err());
        assert!(parse_model_arg("=m.onnx").is_err());
        assert!(parse_model_arg("a/b=m.onnx").is_err());
    }

    #[test]
    fn both_serving_modes_and_prepare_cache_parse() {
        let standalone =
            Args::try_parse_from(["shoal-agent", "--model", "m=m.onnx"]).expect("standalone");
        assert!(standalone.command.is_none());
        assert_eq!(standalone.models.len(), 1);
        let managed = Args::try_parse_from([
            "shoal-agent",
            "--control-plane",
            "https://shoal:8443",
            "--node",
            "n1",
            "--cache-dir",
            "/var/cache/shoal",
        ])
        .expect("managed");
        assert!(managed.command.is_none());
        assert_eq!(managed.node.as_deref(), Some("n1"));
        // What the DaemonSet's init container runs: no --model, no --control-plane.
        let prepare = Args::try_parse_from([
            "shoal-agent",
            "prepare-cache",
            "--dir",
            "/var/cache/shoal",
            "--owner",
            "65532:65532",
        ])
        .expect("prepare-cache");
        match prepare.command {
            Some(Command::PrepareCache { dir, owner }) => {
                assert_eq!(dir, PathBuf::from("/var/cache/shoal"));
                assert_eq!((owner.uid, owner.gid), (65532, 65532));
            }
            None => panic!("prepare-cache parsed as serving"),
        }
        assert!(
            Args::try_parse_from(["shoal-agent"]).is_err(),
            "serving needs a mode"
        );
        assert!(
            Args::try_parse_from(["shoal-agent", "prepare-cache", "--dir", "/c"]).is_err(),
            "--owner is required"
        );
        assert!(
            Args::try_parse_from([
                "shoal-agent",
                "prepare-cache",
                "--dir",
                "/c",
                "--owner",
                "nonroot"
            ])
            .is_err()
        );
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
