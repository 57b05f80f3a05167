//! The ModelRollout controller's I/O shell: every couple of seconds per running
//! rollout it observes the fleet (the cluster view and the agents' latest reports,
//! both in memory: no API call), closes analysis windows, asks the step machine
//! (`steps::decide`) for the next status, writes it when it changed, emits the
//! Events, and clears a handled `shoal.dev/action` annotation.

use super::analysis::{AnalysisWindow, close_window};
use super::observe::{FleetFacts, analysis_due, observe};
use super::steps::{self, Action};
use crate::fleet::Fleet;
use crate::runtime::context::Context;
use crate::runtime::metrics::RolloutLabels;
use crate::runtime::reconcile;
use crate::runtime::status::write_status;
use crate::runtime::{lock, object_key};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::{Predicate, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use shoal_api::{ACTION_ABORT, ACTION_ANNOTATION, ACTION_PROMOTE, ModelRollout};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const CONTROLLER: &str = "rollout";

/// A reconcile of this controller fails only when an API call does.
pub use crate::runtime::reconcile::ApiCallFailed as Error;

struct RolloutContext {
    ctx: Arc<Context>,
    fleet: Arc<Fleet>,
    recorder: Recorder,
    /// The open analysis window of each running rollout, by namespace/name. In
    /// memory: after an operator restart the window starts again.
    windows: Mutex<HashMap<String, AnalysisWindow>>,
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
    tokio::spawn(crate::runtime::context::signal_when_synced(
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
            .map(|rollout| (object_key(rollout.as_ref()), rollout.spec.model.clone()))
            .collect();
        lock(&rctx.windows).retain(|key, _| present.contains_key(key));
        rctx.ctx.metrics.retain_rollouts(|labels| {
            present.get(&format!("{}/{}", labels.namespace, labels.rollout)) == Some(&labels.model)
        });
    }
}

fn error_policy(rollout: Arc<ModelRollout>, error: &Error, rctx: Arc<RolloutContext>) -> Requeue {
    Requeue::requeue(reconcile::retry_delay(
        CONTROLLER,
        &rctx.ctx,
        rollout.as_ref(),
        error,
    ))
}

async fn reconcile(
    rollout: Arc<ModelRollout>,
    rctx: Arc<RolloutContext>,
) -> Result<Requeue, Error> {
    reconcile::timed(
        CONTROLLER,
        &rctx.ctx,
        rollout.as_ref(),
        reconcile_rollout(&rollout, &rctx),
    )
    .await
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
    let facts = FleetFacts::read(&rctx.fleet, rollout);
    let observed = observe(rollout, &facts, now, action);
    let mut observation = observed.observation;
    if let Some((spec, canary, weight)) = analysis_due(rollout) {
        observation.analysis = close_window(
            &mut lock(&rctx.windows),
            &key,
            spec,
            (canary, weight),
            now,
            observed.canary_counters,
            observed.stable_counters,
        );
    }
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
        write_status(&rctx.ctx.client, rollout, &decision.status).await?;
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
