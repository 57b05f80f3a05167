//! `kubectl shoal`: a kubectl plugin to inspect and steer Shoal ModelRollouts.
//!
//! Install the `kubectl-shoal` binary anywhere on PATH; kubectl then runs it as
//! `kubectl shoal …`. It uses the same kubeconfig as kubectl (KUBECONFIG, else
//! ~/.kube/config) and the current context's namespace unless `-n` is given.
//!
//! ```text
//! kubectl shoal get rollouts [-A] [-o json]     list ModelRollouts (alias: get mro)
//! kubectl shoal status ROLLOUT [-w] [--timeout 30m] [-o json]
//!                                               progress, pools, last analysis, history
//! kubectl shoal promote ROLLOUT                 skip the current pause/analysis step
//! kubectl shoal abort ROLLOUT                   send every agent back to the stable version
//! kubectl shoal pause ROLLOUT                   hold the rollout (spec.paused=true)
//! kubectl shoal resume ROLLOUT                  continue it (spec.paused=false)
//! kubectl shoal undo ROLLOUT                    go back to the version the last
//!                                               succeeded rollout started from
//! ```
//!
//! promote and abort set the `shoal.dev/action` annotation, which the operator acts
//! on and removes; the same can be done with plain `kubectl annotate`/`kubectl patch`.
//! Exit code 0 on success, 1 on any error.

mod actions;
mod status_view;
mod table;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, Config, ResourceExt};
use shoal_api::ModelRollout;

use crate::actions::Action;

const ABOUT: &str = "Inspect and steer Shoal ModelRollouts";
const LONG_ABOUT: &str = "Inspect and steer Shoal ModelRollouts.\n\n\
Runs as `kubectl shoal …` when the kubectl-shoal binary is on PATH. Uses the same \
kubeconfig as kubectl (KUBECONFIG, else ~/.kube/config); the namespace is -n/--namespace, \
else the current context's namespace, else \"default\".\n\n\
promote and abort set the shoal.dev/action annotation (the operator acts on it and \
removes it); pause and resume set spec.paused; undo sets spec.version back to the version \
the last succeeded rollout started from.";

const EXAMPLES: &str = "Examples:\n  \
kubectl shoal get rollouts -A\n  \
kubectl shoal status detector-rollout -n shop --watch\n  \
kubectl shoal promote detector-rollout -n shop\n  \
kubectl shoal undo detector-rollout -n shop";

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-shoal",
    bin_name = "kubectl shoal",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXAMPLES
)]
struct Cli {
    /// Namespace of the rollout (default: the kubeconfig context's namespace, else "default").
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List ModelRollouts: NAME MODEL STABLE CANARY PHASE STEP WEIGHT AGE.
    Get {
        /// What to list: rollouts (also rollout, modelrollouts, modelrollout, mro).
        #[arg(value_parser = ["rollouts", "rollout", "modelrollouts", "modelrollout", "mro"])]
        resource: String,
        /// List rollouts in every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format: json prints an array of the rollouts' essentials.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Show a rollout's progress: step, pools, last analysis, history.
    Status {
        /// Name of the ModelRollout.
        rollout: String,
        /// Redraw every 2 seconds until the rollout finishes (Succeeded, RolledBack,
        /// Aborted), Ctrl-C or --timeout.
        #[arg(short = 'w', long)]
        watch: bool,
        /// Give up watching after this long (such as 90s, 10m, 1h); exit code 1.
        #[arg(long, default_value = "30m", value_parser = parse_timeout)]
        timeout: Duration,
        /// Output format: json prints the status object (one line per redraw with --watch).
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Skip the current pause or analysis step (or leave Degraded).
    Promote {
        /// Name of the ModelRollout.
        rollout: String,
    },
    /// Stop the rollout and send every agent back to the stable version.
    Abort {
        /// Name of the ModelRollout.
        rollout: String,
    },
    /// Hold the rollout where it is (sets spec.paused).
    Pause {
        /// Name of the ModelRollout.
        rollout: String,
    },
    /// Continue a paused rollout (clears spec.paused).
    Resume {
        /// Name of the ModelRollout.
        rollout: String,
    },
    /// Roll back to the version the last succeeded rollout started from (sets spec.version).
    Undo {
        /// Name of the ModelRollout.
        rollout: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Json,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    match status_view::parse_duration_ms(text) {
        Some(ms) if ms > 0 => Ok(Duration::from_millis(ms as u64)),
        _ => Err(format!(
            "{text:?} is not a duration such as 90s, 10m or 1h30m"
        )),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Usage errors exit 1 like every other error (clap's own default is 2); --help
    // and --version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A connected client and the namespace to work in.
struct Target {
    client: Client,
    namespace: String,
}

impl Target {
    async fn connect(namespace: Option<String>) -> Result<Self> {
        let config = Config::infer().await.map_err(|e| {
            anyhow!("{e}\nhint: check KUBECONFIG (or ~/.kube/config) and the current context")
        })?;
        let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| {
            anyhow!("{e}\nhint: check KUBECONFIG (or ~/.kube/config) and the current context")
        })?;
        Ok(Self { client, namespace })
    }

    fn api(&self) -> Api<ModelRollout> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn get(&self, name: &str) -> Result<ModelRollout> {
        self.api()
            .get(name)
            .await
            .map_err(|e| self.explain(e, name))
    }

    async fn patch(&self, name: &str, patch: serde_json::Value) -> Result<ModelRollout> {
        self.api()
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|e| self.explain(e, name))
    }

    /// Turns a kube error into a message that says what to do.
    fn explain(&self, error: kube::Error, name: &str) -> anyhow::Error {
        match &error {
            kube::Error::Api(status) if status.is_not_found() => anyhow!(
                "modelrollout {name} not found in namespace {} (kubectl shoal get rollouts lists them)",
                self.namespace
            ),
            kube::Error::Api(status) if status.code == 409 => anyhow!(
                "modelrollout {name} changed while this command ran; try again ({})",
                status.message
            ),
            kube::Error::Api(status) => anyhow!("{}", status.message),
            _ => anyhow!(error).context(
                "cannot reach the Kubernetes API server; check KUBECONFIG and the current context",
            ),
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let target = Target::connect(cli.namespace).await?;
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Get {
            resource: _,
            all_namespaces,
            output,
        } => {
            let api: Api<ModelRollout> = if all_namespaces {
                Api::all(target.client.clone())
            } else {
                target.api()
            };
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(|e| match e {
                    kube::Error::Api(status) if status.is_not_found() => anyhow!(
                        "the ModelRollout resource is not installed in this cluster \
                         (kubectl apply --server-side -f crds/shoal.dev.yaml)"
                    ),
                    other => target.explain(other, ""),
                })?;
            let mut rollouts = list.items;
            rollouts.sort_by_key(|r| (r.namespace(), r.name_any()));
            if output == Some(Output::Json) {
                let summaries: Vec<_> = rollouts.iter().map(status_view::rollout_summary).collect();
                writeln!(stdout, "{}", serde_json::to_string_pretty(&summaries)?)?;
            } else if rollouts.is_empty() {
                if all_namespaces {
                    eprintln!("No ModelRollouts found.");
                } else {
                    eprintln!("No ModelRollouts found in {} namespace.", target.namespace);
                }
            } else {
                let table =
                    status_view::rollouts_table(&rollouts, all_namespaces, Timestamp::now());
                write!(stdout, "{table}")?;
            }
        }
        Command::Status {
            rollout,
            watch,
            timeout,
            output,
        } => {
            drop(stdout);
            return status(&target, &rollout, watch, timeout, output).await;
        }
        Command::Promote { rollout } => {
            act(&target, &rollout, Action::Promote).await?;
            writeln!(stdout, "rollout {rollout}: promote requested")?;
        }
        Command::Abort { rollout } => {
            act(&target, &rollout, Action::Abort).await?;
            writeln!(stdout, "rollout {rollout}: abort requested")?;
        }
        Command::Pause { rollout } => {
            let current = target.get(&rollout).await?;
            if current.spec.paused {
                writeln!(stdout, "rollout {rollout}: already paused")?;
            } else {
                target.patch(&rollout, actions::paused_patch(true)).await?;
                writeln!(stdout, "rollout {rollout}: paused")?;
            }
        }
        Command::Resume { rollout } => {
            let current = target.get(&rollout).await?;
            if current.spec.paused {
                target.patch(&rollout, actions::paused_patch(false)).await?;
                writeln!(stdout, "rollout {rollout}: resumed")?;
            } else {
                writeln!(stdout, "rollout {rollout}: not paused")?;
            }
        }
        Command::Undo { rollout } => {
            let current = target.get(&rollout).await?;
            let (to, was) = actions::undo_target(&current)?;
            let patch = actions::version_patch(&to, current.metadata.resource_version.as_deref());
            target.patch(&rollout, patch).await?;
            writeln!(
                stdout,
                "rollout {rollout}: rolling back to version {to} (was {was})"
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn act(target: &Target, name: &str, action: Action) -> Result<()> {
    let current = target.get(name).await?;
    actions::check_action(&current, action)?;
    target.patch(name, actions::action_patch(action)).await?;
    Ok(())
}

/// Clears the terminal and moves the cursor home.
const CLEAR_SCREEN: &str = "\x1b[2J\x1b[H";
/// How often `status --watch` redraws.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

async fn status(
    target: &Target,
    name: &str,
    watch: bool,
    timeout: Duration,
    output: Option<Output>,
) -> Result<ExitCode> {
    let terminal = std::io::stdout().is_terminal();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = true;
    loop {
        let rollout = target.get(name).await?;
        let text = match output {
            Some(Output::Json) => {
                let status = serde_json::to_value(rollout.status.clone().unwrap_or_default())
                    .context("serialising the status")?;
                if watch {
                    format!("{}\n", serde_json::to_string(&status)?)
                } else {
                    format!("{}\n", serde_json::to_string_pretty(&status)?)
                }
            }
            None => status_view::status_view(&rollout, Timestamp::now()),
        };
        {
            let mut stdout = std::io::stdout().lock();
            if watch && output.is_none() {
                if terminal {
                    write!(stdout, "{CLEAR_SCREEN}")?;
                } else if !first {
                    writeln!(stdout, "----")?;
                }
            }
            write!(stdout, "{text}")?;
            stdout.flush()?;
        }
        first = false;
        if !watch || status_view::is_finished(&rollout) {
            return Ok(ExitCode::SUCCESS);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(anyhow!(
                "timed out after {} waiting for rollout {name} to finish",
                status_view::short_duration(timeout.as_secs() as i64)
            ));
        }
        let next = (now + WATCH_INTERVAL).min(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::from(130)),
        }
    }
}
