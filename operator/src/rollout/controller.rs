//! The ModelRollout controller's I/O shell: every couple of seconds per running
//! rollout it observes the fleet (the cluster view and the agents' latest reports,
//! both in memory: no API call), closes analysis windows, asks the step machine
//! (`steps::decide`) for the next status, writes it when it changed, emits the
//! Events, and clears a handled `shoal.dev/action` annotation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::{Predicate, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use shoal_api::agent_protocol::ModelState;
use shoal_api::{
    ACTION_ABORT, ACTION_ANNOTATION, ACTION_PROMOTE, AnalysisResult, ModelRollout,
    ModelRolloutStatus,
};

use super::analysis::{self, Counters};
use super::cohort;
use super::steps::{self, Action, Observation, PoolObservation};
use crate::agent_api::fleet::Fleet;
use crate::agent_api::pool_agents::{AgentState, agent_state};
use crate::context::{Context, FIELD_MANAGER};
use crate::metrics::RolloutLabels;

pub const CONTROLLER: &str = "rollout";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
}

struct RolloutContext {
    ctx: Arc<Context>,
    fleet: Arc<Fleet>,
    recorder: Recorder,
    /// The open analysis window of each running rollout, by namespace/name. In
    /// memory: after an operator restart the window starts again.
    windows: Mutex<HashMap<String, AnalysisWindow>>,
}

/// Counters at the start of an analysis window, per node, for both cohorts. A window
/// covers one canary version at one weight: when the weight changes, the next verdict
/// is about the new cohort only.
struct AnalysisWindow {
    canary_version: String,
    weight: i32,
    started: Timestamp,
    next_check: Timestamp,
    canary: HashMap<String, Counters>,
    stable: HashMap<String, Counters>,
}

/// Runs the ModelRollout controller until shutdown. `namespace` limits it to one namespace.
pub async fn run(
    ctx: Arc<Context>,
    fleet: Arc<Fleet>,
    namespace: Option<String>,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let rollouts: Api<ModelRollout> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (reader, writer) = reflector::store();
    // Status writes change neither the generation nor the annotations: the
    // controller does not wake itself; it polls running rollouts by requeueing.
    let stream = watcher(rollouts, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::annotations),
            Default::default(),
        );
    tokio::spawn(crate::context::signal_when_synced(
        reader.clone(),
        "modelrollout",
        synced,
    ));
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter {
            controller: "shoal-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let context = Arc::new(RolloutContext {
        ctx,
        fleet,
        recorder,
        windows: Mutex::new(HashMap::new()),
    });
    tokio::spawn(forget_deleted_rollouts(reader.clone(), context.clone()));
    Controller::for_stream(stream, reader)
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|_| async {})
        .await;
}

/// How often the analysis windows and gauges of deleted rollouts are dropped.
const FORGET_EVERY: Duration = Duration::from_secs(30);

/// Every [`FORGET_EVERY`], drops what the controller keeps in memory about rollouts
/// that no longer exist (a deleted rollout is not reconciled again): its open
/// analysis window and its metric series.
async fn forget_deleted_rollouts(reader: Store<ModelRollout>, rctx: Arc<RolloutContext>) {
    if reader.wait_until_ready().await.is_err() {
        return;
    }
    let mut interval = tokio::time::interval(FORGET_EVERY);
    loop {
        interval.tick().await;
        let present: HashMap<String, String> = reader
            .state()
            .iter()
            .map(|rollout| (object_key(rollout), rollout.spec.model.clone()))
            .collect();
        lock(&rctx.windows).retain(|key, _| present.contains_key(key));
        rctx.ctx.metrics.retain_rollouts(|labels| {
            present.get(&format!("{}/{}", labels.namespace, labels.rollout)) == Some(&labels.model)
        });
    }
}

fn error_policy(rollout: Arc<ModelRollout>, error: &Error, rctx: Arc<RolloutContext>) -> Requeue {
    rctx.ctx.metrics.reconcile_failed(CONTROLLER, "kube");
    let key = object_key(&rollout);
    let delay = rctx.ctx.backoff.next_delay(&key);
    tracing::warn!(rollout = %key, %error, retry_in = ?delay, "rollout reconcile failed");
    Requeue::requeue(delay)
}

async fn reconcile(
    rollout: Arc<ModelRollout>,
    rctx: Arc<RolloutContext>,
) -> Result<Requeue, Error> {
    let started = Instant::now();
    let result = reconcile_rollout(&rollout, &rctx).await;
    rctx.ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        rctx.ctx.backoff.reset(&object_key(&rollout));
    }
    result
}

async fn reconcile_rollout(
    rollout: &ModelRollout,
    rctx: &RolloutContext,
) -> Result<Requeue, Error> {
    if !rctx.fleet.cluster.is_synced() {
        return Ok(Requeue::requeue(Duration::from_secs(1)));
    }
    let key = object_key(rollout);
    let now = Timestamp::now();
    let action_text = rollout.annotations().get(ACTION_ANNOTATION).cloned();
    let action = match action_text.as_deref() {
        Some(ACTION_PROMOTE) => Some(Action::Promote),
        Some(ACTION_ABORT) => Some(Action::Abort),
        _ => None,
    };
    let observation = observe(rollout, rctx, now, action);
    let decision = steps::decide(
        &rollout.spec,
        rollout.metadata.generation,
        rollout.status.as_ref(),
        &observation,
    );
    let api: Api<ModelRollout> = Api::namespaced(
        rctx.ctx.client.clone(),
        &rollout.namespace().unwrap_or_default(),
    );
    if rollout.status.as_ref() != Some(&decision.status) {
        write_status(&api, rollout, &decision.status).await?;
    }
    let labels = RolloutLabels {
        namespace: rollout.namespace().unwrap_or_default(),
        rollout: rollout.name_any(),
        model: rollout.spec.model.clone(),
    };
    rctx.ctx.metrics.rollout_status(&labels, &decision.status);
    for event in &decision.events {
        rctx.ctx.metrics.rollout_event(&labels, event.reason);
        tracing::info!(rollout = %key, reason = event.reason, message = %event.message, "rollout event");
        let published = rctx
            .recorder
            .publish(
                &Event {
                    type_: if event.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: event.reason.to_string(),
                    note: Some(event.message.clone()),
                    action: event.action.clone(),
                    secondary: None,
                },
                &rollout.object_ref(&()),
            )
            .await;
        if let Err(error) = published {
            tracing::warn!(rollout = %key, %error, "could not publish a rollout event");
        }
    }
    if let Some(text) = action_text {
        if action.is_none() {
            tracing::warn!(rollout = %key, action = %text, "unknown shoal.dev/action ignored; use promote or abort");
        }
        let patch = json!({ "metadata": { "annotations": { ACTION_ANNOTATION: null } } });
        api.patch(
            &rollout.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    let running = decision
        .status
        .phase
        .is_some_and(|phase| !phase.is_finished());
    if !running {
        lock(&rctx.windows).remove(&key);
    }
    Ok(Requeue::requeue(decision.requeue))
}

/// Everything the step machine needs to know, read from memory.
fn observe(
    rollout: &ModelRollout,
    rctx: &RolloutContext,
    now: Timestamp,
    action: Option<Action>,
) -> Observation {
    let namespace = rollout.namespace().unwrap_or_default();
    let name = rollout.name_any();
    let spec = &rollout.spec;
    let status = rollout.status.clone().unwrap_or_default();
    let view = &rctx.fleet.cluster;
    let others: Vec<ModelRollout> = view
        .rollouts_in(&namespace)
        .into_iter()
        .filter(|other| {
            other.name_any() != name
                && other.spec.model == spec.model
                && other.spec.pools.iter().any(|p| spec.pools.contains(p))
        })
        .collect();
    let running = |status: Option<&ModelRolloutStatus>| {
        status.is_some_and(|s| {
            s.canary_version.is_some() && s.phase.is_some_and(|phase| !phase.is_finished())
        })
    };
    // The view keeps a canary version only for running rollouts.
    let conflict = if running(Some(&status)) {
        None
    } else {
        others
            .iter()
            .find(|other| {
                other
                    .status
                    .as_ref()
                    .is_some_and(|s| s.canary_version.is_some())
            })
            .map(|other| {
                format!(
                    "ModelRollout {} is rolling out Model {} in the same pools; this one waits \
                     until it finishes (or abort it: kubectl shoal abort {})",
                    other.name_any(),
                    spec.model,
                    other.name_any()
                )
            })
    };
    let inherited_stable = others
        .iter()
        .filter_map(|other| {
            let stable = other.status.as_ref()?.stable_version.clone()?;
            Some((other.creation_timestamp().map(|t| t.0), stable))
        })
        .max()
        .map(|(_, stable)| stable);
    let target_ready = view
        .model(&namespace, &spec.model)
        .and_then(|model| model.status)
        .is_some_and(|s| s.versions.iter().any(|v| v.version == spec.version));

    let canary = status.canary_version.clone();
    let mut pools = Vec::with_capacity(spec.pools.len());
    let mut canary_now: HashMap<String, Counters> = HashMap::new();
    let mut stable_now: HashMap<String, Counters> = HashMap::new();
    for pool in &spec.pools {
        let nodes = view.pool_nodes(&namespace, pool).unwrap_or_default();
        let reports = rctx.fleet.reports.for_pool(&namespace, pool);
        let updated = status
            .pools
            .iter()
            .find(|p| &p.pool == pool)
            .map_or(0, |p| p.updated.max(0) as usize);
        let order = cohort::CanaryOrder::new(&namespace, &name, nodes.keys().map(String::as_str));
        let mut observed = PoolObservation {
            pool: pool.clone(),
            agents: nodes.len() as i32,
            ready: 0,
            failed: 0,
        };
        for (rank, node) in order.nodes().enumerate() {
            let latest = reports.get(node);
            let model_report = |version: &str| {
                latest.and_then(|l| {
                    l.report
                        .models
                        .iter()
                        .find(|m| m.name == spec.model && m.version == version)
                })
            };
            if let Some(stable) = &status.stable_version
                && let Some(report) = model_report(stable)
            {
                stable_now.insert(node.to_string(), Counters::from_report(report));
            }
            let Some(canary) = &canary else { continue };
            if let Some(report) = model_report(canary) {
                canary_now.insert(node.to_string(), Counters::from_report(report));
            }
            if rank >= updated {
                continue;
            }
            let state = agent_state(
                latest.map(|l| l.received),
                nodes.get(node).and_then(|info| info.created),
                now,
                rctx.fleet.stale_after,
                rctx.fleet.started,
            );
            match (state, model_report(canary).map(|m| m.state)) {
                (AgentState::Stale, _) if latest.is_some() => observed.failed += 1,
                (AgentState::Connected, Some(ModelState::Serving)) => observed.ready += 1,
                (AgentState::Connected, Some(ModelState::Failed)) => observed.failed += 1,
                _ => {}
            }
        }
        pools.push(observed);
    }

    let analysis = match (&spec.analysis, &canary) {
        (Some(analysis_spec), Some(canary))
            if running(Some(&status)) && status.weight.unwrap_or(0) > 0 =>
        {
            close_window(
                rctx,
                &object_key(rollout),
                analysis_spec,
                (canary, status.weight.unwrap_or(0)),
                now,
                canary_now,
                stable_now,
            )
        }
        _ => None,
    };
    Observation {
        now,
        target_ready,
        inherited_stable,
        pools,
        analysis,
        action,
        conflict,
    }
}

/// The verdict of the rollout's analysis window if it is due, else None. A
/// conclusive verdict starts a new window; an inconclusive one lets the window grow
/// and looks again an interval later.
fn close_window(
    rctx: &RolloutContext,
    key: &str,
    spec: &shoal_api::AnalysisSpec,
    (canary_version, weight): (&str, i32),
    now: Timestamp,
    canary_now: HashMap<String, Counters>,
    stable_now: HashMap<String, Counters>,
) -> Option<AnalysisResult> {
    let interval =
        steps::parse_duration(spec.interval_or_default()).unwrap_or(Duration::from_secs(30));
    let after = |t: Timestamp| t.checked_add(interval).unwrap_or(t);
    let mut windows = lock(&rctx.windows);
    let fresh = |canary, stable| AnalysisWindow {
        canary_version: canary_version.to_string(),
        weight,
        started: now,
        next_check: after(now),
        canary,
        stable,
    };
    let window = match windows.get_mut(key) {
        Some(window) if window.canary_version == canary_version && window.weight == weight => {
            window
        }
        _ => {
            windows.insert(key.to_string(), fresh(canary_now, stable_now));
            return None;
        }
    };
    if now < window.next_check {
        return None;
    }
    let canary_delta: Vec<Counters> = canary_now
        .iter()
        .map(|(node, c)| c.since(window.canary.get(node)))
        .collect();
    let stable_delta: Vec<Counters> = stable_now
        .iter()
        .map(|(node, c)| c.since(window.stable.get(node)))
        .collect();
    let canary = analysis::cohort(&canary_delta);
    let stable = analysis::cohort(&stable_delta);
    let (verdict, message) = analysis::verdict(spec, &canary, &stable);
    let seconds = Duration::try_from(now.duration_since(window.started))
        .unwrap_or_default()
        .as_secs();
    if verdict == AnalysisResult::INCONCLUSIVE {
        window.next_check = after(now);
    } else {
        *window = fresh(canary_now, stable_now);
    }
    Some(AnalysisResult {
        time: Some(Time(now)),
        canary,
        stable,
        verdict: verdict.to_string(),
        message: format!("{message} (window {seconds}s)"),
    })
}

async fn write_status(
    api: &Api<ModelRollout>,
    rollout: &ModelRollout,
    status: &ModelRolloutStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ModelRollout",
        "status": status,
    });
    api.patch_status(
        &rollout.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

fn object_key(rollout: &ModelRollout) -> String {
    format!(
        "{}/{}",
        rollout.namespace().unwrap_or_default(),
        rollout.name_any()
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
