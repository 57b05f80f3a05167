//! `shoal-operator`: runs Shoal's controllers (`run`), prints its CRDs (`crd`) and
//! compresses models (`compress`).

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use shoal_operator::agent_api::connection_limits::{self, ConnectionLimits};
use shoal_operator::agent_api::listener::{AgentApiListener, TlsFiles};
use shoal_operator::agent_api::{AgentApi, parse_duration_flag};
use shoal_operator::artifacts::fetch;
use shoal_operator::artifacts::source_policy::{Network, SourcePolicy};
use shoal_operator::artifacts::store::ArtifactStore;
use shoal_operator::compression::command as compress_command;
use shoal_operator::controllers::edge_pool::daemonset::AgentDefaults;
use shoal_operator::controllers::edge_pool::policy::PoolPolicy;
use shoal_operator::controllers::{edge_pool, model, rollout};
use shoal_operator::fleet::Fleet;
use shoal_operator::runtime::backoff::Backoff;
use shoal_operator::runtime::context::Context;
use shoal_operator::runtime::metrics::Metrics;
use shoal_operator::runtime::{http_server, leader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "shoal-operator",
    version,
    about = "Ships ML models to fleets of edge Kubernetes nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers against the cluster in KUBECONFIG (or in-cluster config).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions as YAML (what `kubectl apply -f crds/` installs).
    Crd,
    /// Compress an ONNX model (int8 or fp16), validate it against the original and
    /// print a JSON report; the output is written only when the gate holds.
    Compress(Box<compress_command::CompressArgs>),
    /// Print every metric this binary exports, each with an example series (for
    /// dashboards and alert rules to be checked against).
    #[command(hide = true)]
    Metrics,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of the content-addressed artifact store (a PersistentVolume in production).
    #[arg(
        long,
        env = "SHOAL_ARTIFACT_DIR",
        default_value = "/var/lib/shoal/artifacts"
    )]
    artifact_dir: PathBuf,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SHOAL_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SHOAL_NAMESPACE")]
    namespace: Option<String>,
    /// URL of the operator's agent API as edge agents reach it.
    #[arg(
        long,
        env = "SHOAL_AGENT_API_URL",
        default_value = "https://shoal-operator.shoal-system.svc:8443"
    )]
    agent_api_url: String,
    /// Address the agent API listens on for edge agents. Plain HTTP (no --tls-cert)
    /// is allowed on loopback addresses only, for local development.
    #[arg(long, env = "SHOAL_AGENT_API_ADDR", default_value = "127.0.0.1:8443")]
    agent_api_addr: SocketAddr,
    /// PEM certificate (chain) the agent API serves HTTPS with; needs --tls-key.
    #[arg(long, env = "SHOAL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM file of the CA that signed --tls-cert, for agents that cannot verify it with
    /// public roots: the operator gives it to each pool's agents (a ConfigMap
    /// shoal-agent-<pool>-ca, passed as --control-plane-ca).
    #[arg(long, env = "SHOAL_AGENT_API_CA")]
    agent_api_ca: Option<PathBuf>,
    /// Connections the agent API holds at once; more are closed when accepted.
    #[arg(long, env = "SHOAL_AGENT_API_MAX_CONNECTIONS", default_value_t = connection_limits::DEFAULT_MAX_CONNECTIONS)]
    agent_api_max_connections: usize,
    /// Connections the agent API holds at once from one source address (0: no cap).
    /// Raise it when agents come through a NAT or load balancer that hides their
    /// addresses.
    #[arg(long, env = "SHOAL_AGENT_API_MAX_CONNECTIONS_PER_SOURCE", default_value_t = connection_limits::DEFAULT_MAX_PER_SOURCE)]
    agent_api_max_connections_per_source: usize,
    /// An agent that has not reported for this long counts as stale (90s, 2m, …).
    #[arg(long, env = "SHOAL_AGENT_STALE_AFTER", default_value = "90s", value_parser = parse_duration_flag)]
    agent_stale_after: Duration,
    /// Largest model source accepted, in bytes.
    #[arg(long, env = "SHOAL_MAX_MODEL_BYTES", default_value_t = 1 << 30)]
    max_model_bytes: u64,
    /// A network (CIDR) whose internal addresses Model http sources may reach, such as
    /// an in-cluster model store (10.0.0.0/8). Repeatable. Public addresses are
    /// always allowed; loopback, private, link-local (cloud metadata) and
    /// unique-local ones only where named here.
    #[arg(
        long = "allow-source-network",
        env = "SHOAL_ALLOW_SOURCE_NETWORKS",
        value_delimiter = ','
    )]
    allow_source_networks: Vec<Network>,
    /// PEM file of a CA that Model https sources may be signed by, trusted beside the
    /// public roots (an in-house model store).
    #[arg(long, env = "SHOAL_MODEL_SOURCE_CA")]
    model_source_ca: Option<PathBuf>,
    /// An image repository (registry/path, matched up to :tag or @digest) or a prefix
    /// ending in / that EdgePools may run agents from. Repeatable. Default: the
    /// official agent repository.
    #[arg(
        long = "allowed-agent-image",
        env = "SHOAL_ALLOWED_AGENT_IMAGES",
        value_delimiter = ',',
        default_value = shoal_api::edge_pool::AGENT_IMAGE_REPOSITORY
    )]
    allowed_agent_images: Vec<String>,
    /// A taint key EdgePools may tolerate with NoExecute or every effect (or, for
    /// node-role.kubernetes.io/control-plane, tolerate and select nodes by).
    /// Repeatable. Default: none.
    #[arg(
        long = "allowed-toleration-key",
        env = "SHOAL_ALLOWED_TOLERATION_KEYS",
        value_delimiter = ','
    )]
    allowed_toleration_keys: Vec<String>,
    /// Model compressions that may run at once; each keeps a core busy.
    #[arg(long, env = "SHOAL_MAX_CONCURRENT_COMPRESSIONS", default_value_t = 1)]
    max_concurrent_compressions: usize,
    /// Run for leadership on a Lease, so that several replicas can run: only the
    /// leader runs the controllers; every replica serves the agent API.
    #[arg(long, env = "SHOAL_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "SHOAL_LEADER_ELECTION_LEASE",
        default_value = "shoal-operator"
    )]
    leader_election_lease: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// Log format.
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", shoal_api::crds_yaml());
            Ok(())
        }
        Command::Run(args) => run(*args).await,
        Command::Metrics => {
            print!("{}", Metrics::with_example_series().render());
            Ok(())
        }
        Command::Compress(args) => {
            let code = tokio::task::spawn_blocking(move || compress_command::run(*args)).await??;
            std::process::exit(code);
        }
    }
}

/// Raises the soft limit on open files to the hard limit: the default soft limit
/// (often 1024) is far below the agent API's connection cap, and the process would
/// fail to accept (or to open an artifact) long before reaching it.
fn raise_open_files_limit(wanted_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    let mut now = before;
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => now = limit.maximum,
            Err(error) => {
                tracing::warn!(%error, soft = ?before, hard = ?limit.maximum, "cannot raise the open-files limit")
            }
        }
    }
    // None: no limit.
    let needed = wanted_connections as u64 + 1024;
    if now.is_some_and(|open_files| open_files < needed) {
        tracing::warn!(
            open_files = ?now,
            agent_api_max_connections = wanted_connections,
            "the open-files limit is below the agent API's connection cap plus room for artifacts and API calls: raise the container's nofile limit or lower --agent-api-max-connections"
        );
    } else {
        tracing::info!(open_files = ?now, was = ?before, "open-files limit");
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,tower=warn,hyper=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let client = kube::Client::try_default().await.context(
        "cannot reach the Kubernetes API: set KUBECONFIG or run in a pod with a ServiceAccount",
    )?;
    let artifacts = ArtifactStore::open(&args.artifact_dir).with_context(|| {
        format!(
            "cannot open the artifact store at {}",
            args.artifact_dir.display()
        )
    })?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(http_server::Readiness::default());
    let tls = args
        .tls_cert
        .zip(args.tls_key)
        .map(|(cert, key)| TlsFiles { cert, key });
    raise_open_files_limit(args.agent_api_max_connections);
    let limits = ConnectionLimits::new(
        args.agent_api_max_connections,
        args.agent_api_max_connections_per_source,
    );
    let agent_listener = AgentApiListener::bind(args.agent_api_addr, tls.as_ref(), limits).await?;
    let fleet = Arc::new(Fleet::new(args.agent_stale_after));
    let agent_api = AgentApi::new(
        client.clone(),
        fleet.clone(),
        artifacts.clone(),
        metrics.clone(),
    );
    let control_plane_ca = match &args.agent_api_ca {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read --agent-api-ca {}; it must be the PEM of the CA that signed the agent API certificate",
                path.display()
            )
        })?),
        None => None,
    };
    let agent_defaults = AgentDefaults {
        control_plane_url: args.agent_api_url,
        control_plane_ca,
    };
    let model_source_ca = match &args.model_source_ca {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("cannot read --model-source-ca {}", path.display()))?,
        ),
        None => None,
    };
    let pool_policy = PoolPolicy {
        allowed_images: args.allowed_agent_images.clone(),
        allowed_toleration_keys: args.allowed_toleration_keys.clone(),
    };
    let source_policy = Arc::new(SourcePolicy::new(args.allow_source_networks.clone()));
    let ctx = Arc::new(Context {
        client,
        artifacts,
        http: fetch::http_client(source_policy.clone(), model_source_ca.as_deref())?,
        source_policy,
        metrics: metrics.clone(),
        backoff: Backoff::default(),
        max_model_bytes: args.max_model_bytes,
        compression_slots: tokio::sync::Semaphore::new(args.max_concurrent_compressions.max(1)),
        compression_records: shoal_operator::compression::records::Records::new(&args.artifact_dir),
    });

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    tracing::info!(addr = %args.metrics_addr, namespace = ?args.namespace, "shoal-operator starting");
    let server = axum::serve(listener, http_server::router(metrics, readiness.clone()));
    tokio::spawn(async move {
        if let Err(error) = server.await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    tracing::info!(addr = %args.agent_api_addr, tls = agent_listener.is_tls(), "agent API listening");
    tokio::spawn(agent_listener.serve(agent_api.router()));
    fleet.follow_cluster(ctx.client.clone(), args.namespace.clone());

    if args.leader_elect {
        let identity = args.leader_election_identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "shoal-operator".into());
            format!("{host}-{}", std::process::id())
        });
        let config = leader::LeaseConfig::new(
            args.leader_election_namespace.clone(),
            args.leader_election_lease.clone(),
            identity,
        );
        fleet.set_leading(false);
        // A follower serves the agent API from its watches: ready once they synced.
        let follower_ready = readiness.clone();
        let view = fleet.clone();
        tokio::spawn(async move {
            view.cluster.wait_synced().await;
            follower_ready.set_ready();
        });
        let (leading_tx, mut leading_rx) = tokio::sync::watch::channel(false);
        let client = ctx.client.clone();
        tokio::spawn(async move {
            leader::campaign(client, config, leading_tx).await;
            tracing::error!(
                "stopped leading; exiting so that the restart rejoins as a candidate \
                 (controllers must never run on two replicas)"
            );
            std::process::exit(1);
        });
        tracing::info!(lease = %args.leader_election_lease, namespace = %args.leader_election_namespace, "waiting to become the leader; serving the agent API meanwhile");
        while !*leading_rx.borrow_and_update() {
            if leading_rx.changed().await.is_err() {
                return Ok(());
            }
        }
        fleet.set_leading(true);
    }

    let (model_synced, model_synced_rx) = tokio::sync::oneshot::channel();
    let (pool_synced, pool_synced_rx) = tokio::sync::oneshot::channel();
    let (rollout_synced, rollout_synced_rx) = tokio::sync::oneshot::channel();
    let view_synced = fleet.clone();
    tokio::spawn(async move {
        if model_synced_rx.await.is_ok()
            && pool_synced_rx.await.is_ok()
            && rollout_synced_rx.await.is_ok()
        {
            view_synced.cluster.wait_synced().await;
            readiness.set_ready();
            tracing::info!("controllers' caches synced; ready");
        }
    });
    tokio::join!(
        model::run(ctx.clone(), args.namespace.clone(), model_synced),
        edge_pool::run(
            ctx.clone(),
            fleet.clone(),
            agent_defaults,
            pool_policy,
            args.namespace.clone(),
            pool_synced
        ),
        rollout::run(ctx.clone(), fleet, args.namespace.clone(), rollout_synced),
    );
    tracing::info!("shoal-operator stopped");
    Ok(())
}
