//! The rollout step machine: from a ModelRollout's spec, its last status and what the
//! controller observed now, the next status and the Events to emit. Pure: no I/O,
//! the clock comes in the observation.
//!
//! The status is the whole plan agents are assigned from (`agent_api::assignment`):
//! `stableVersion`, `canaryVersion` and, per pool, `updated` — how many agents of the
//! pool (the lowest-ranked, see `cohort`) get the canary. Everything else serves
//! stable. So no agent is ever assigned a version outside {stable, canary}.

use crate::runtime::conditions;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use shoal_api::condition::{ConditionStatus, new_condition, set_condition};
use shoal_api::{
    AnalysisResult, FinishedRollout, ModelRolloutSpec, ModelRolloutStatus, PoolProgress,
    RolloutPhase, RolloutStep,
};

use crate::placement::cohort::{max_unavailable, next_updated, target_count};

/// Finished rollouts kept in `status.history`.
pub const HISTORY_LIMIT: usize = 10;
/// How soon to look again while a rollout moves.
pub const ACTIVE_REQUEUE: Duration = Duration::from_secs(2);
/// How soon to look again once it finished (agents may still be catching up).
pub const IDLE_REQUEUE: Duration = Duration::from_secs(30);
pub use crate::runtime::conditions::ACCEPTED;

/// What a person asked for through the `shoal.dev/action` annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Promote,
    Abort,
}

/// One pool as the controller sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolObservation {
    pub pool: String,
    /// Nodes the pool selects (one agent each).
    pub agents: i32,
    /// Agents assigned the canary that report serving it.
    pub ready: i32,
    /// Agents assigned the canary that report failing it, or went silent.
    pub failed: i32,
}

#[derive(Debug, Clone)]
pub struct Observation {
    pub now: Timestamp,
    /// The target version is Ready in the Model (it can be assigned).
    pub target_ready: bool,
    /// For a rollout object without a stable version: the version another, finished
    /// rollout of the same model made these pools serve, if any.
    pub inherited_stable: Option<String>,
    pub pools: Vec<PoolObservation>,
    /// An analysis verdict reached in this pass (a window closed).
    pub analysis: Option<AnalysisResult>,
    pub action: Option<Action>,
    /// Another running rollout holds this model in one of these pools: why.
    pub conflict: Option<String>,
}

/// A Kubernetes Event to emit about the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
    /// What the event is about, distinct per transition ("StepStarted 2.0 step 3"):
    /// Event recorders fold events with the same reason and action into one series.
    pub action: String,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub status: ModelRolloutStatus,
    pub events: Vec<RolloutEvent>,
    pub requeue: Duration,
}

/// The next status of a rollout.
pub fn decide(
    spec: &ModelRolloutSpec,
    generation: Option<i64>,
    current: Option<&ModelRolloutStatus>,
    observation: &Observation,
) -> Decision {
    let mut machine = Machine {
        spec,
        observation,
        status: current.cloned().unwrap_or_default(),
        events: Vec::new(),
        requeue: ACTIVE_REQUEUE,
        promote: observation.action == Some(Action::Promote),
        fresh: false,
    };
    machine.status.observed_generation = generation;
    machine.run();
    Decision {
        status: machine.status,
        events: machine.events,
        requeue: machine.requeue,
    }
}

struct Machine<'a> {
    spec: &'a ModelRolloutSpec,
    observation: &'a Observation,
    status: ModelRolloutStatus,
    events: Vec<RolloutEvent>,
    requeue: Duration,
    /// A promote not yet spent on a step.
    promote: bool,
    /// The canary changed in this pass: the observation's counts, failures and
    /// verdict are about the previous canary and must not judge this one.
    fresh: bool,
}

impl Machine<'_> {
    fn run(&mut self) {
        if let Some(why) = &self.observation.conflict {
            self.set_accepted(false, conditions::rollout::CONFLICT, why);
            self.status.message = Some(why.clone());
            self.requeue = IDLE_REQUEUE;
            return;
        }
        self.set_accepted(
            true,
            conditions::rollout::ACCEPTED,
            "the operator runs this rollout",
        );
        if let Some(analysis) = &self.observation.analysis {
            self.status.last_analysis = Some(analysis.clone());
        }
        let target = self.spec.version.clone();
        let running = self.is_running();
        if running && self.observation.action == Some(Action::Abort) {
            let stable = self.stable_name();
            self.finish(
                RolloutPhase::Aborted,
                format!("aborted by a person; every agent goes back to {stable}"),
            );
            return;
        }
        let is_new = self.status.canary_version.as_deref() != Some(target.as_str())
            && (running || self.status.stable_version.as_deref() != Some(target.as_str()));
        if is_new && !self.start(&target) {
            // The new version is not Ready yet: the running canary, if any, is still
            // judged and held where it is.
            if running {
                if let Some(why) = self.failure() {
                    self.fail(why);
                } else {
                    self.hold_pools();
                }
            }
            return;
        }
        if !self.is_running() {
            self.finished_pools();
            self.requeue = IDLE_REQUEUE;
            return;
        }
        if let Some(why) = self.failure() {
            self.fail(why);
            return;
        }
        if self.status.phase == Some(RolloutPhase::Degraded) {
            if !self.promote {
                self.hold_pools();
                return;
            }
            self.promote = false;
            self.event(
                false,
                conditions::rollout::PROMOTED,
                "promoted out of Degraded by a person".into(),
            );
            self.next_step();
        }
        if self.spec.paused {
            self.hold_pools();
            self.status.phase = Some(RolloutPhase::Paused);
            self.status.message =
                Some("paused by spec.paused; resume with kubectl shoal resume".into());
            return;
        }
        self.run_steps();
    }

    fn is_running(&self) -> bool {
        self.status.canary_version.is_some()
            && self
                .status
                .phase
                .is_some_and(|phase| !phase.is_finished() && phase != RolloutPhase::Unknown)
    }

    /// Begins rolling out `target`. False when it cannot begin yet.
    fn start(&mut self, target: &str) -> bool {
        if self.status.stable_version.is_none() {
            self.status.stable_version = self.observation.inherited_stable.clone();
        }
        if !self.observation.target_ready {
            if !self.is_running() {
                self.status.phase = Some(RolloutPhase::Progressing);
            }
            self.status.message = Some(format!(
                "waiting for version {target} of Model {} to become Ready",
                self.spec.model
            ));
            return false;
        }
        if self.is_running()
            && let Some(old) = self.status.canary_version.clone()
        {
            self.record_history(
                RolloutPhase::Aborted,
                &old,
                format!("superseded by {target}"),
            );
            // A first rollout (nothing was stable) moved every agent to its canary at
            // once: that is what the pools serve now, so it is what to fall back to.
            if self.status.stable_version.is_none() {
                self.status.stable_version = Some(old);
            }
        }
        self.fresh = true;
        if self.status.stable_version.as_deref() == Some(target) {
            // The pools already serve the target (a rollout object taking over from
            // an older one): nothing to move.
            self.status.canary_version = Some(target.to_string());
            self.status.phase = Some(RolloutPhase::Succeeded);
            self.status.weight = Some(100);
            self.status.current_step = Some(self.spec.steps.len() as i32);
            self.status.message = Some(format!("the pools already serve {target}"));
            return true;
        }
        let from = self.stable_name();
        self.status.canary_version = Some(target.to_string());
        self.status.phase = Some(RolloutPhase::Progressing);
        self.status.weight = Some(0);
        self.status.last_analysis = None;
        self.status.pools.clear();
        self.status.step_started_at = Some(Time(self.observation.now));
        let all_at_once = self.all_at_once();
        self.status.current_step = Some(if all_at_once {
            self.spec.steps.len() as i32
        } else {
            0
        });
        let how = if self.status.stable_version.is_none() {
            "no version served yet: every agent moves at once".to_string()
        } else if self.spec.steps.is_empty() {
            "no steps: every agent moves at once".to_string()
        } else {
            format!("{} steps", self.spec.steps.len())
        };
        self.event(
            false,
            conditions::rollout::ROLLOUT_STARTED,
            format!(
                "rolling {} from {from} to {target} ({how})",
                self.spec.model
            ),
        );
        true
    }

    /// Without steps, or with no stable version to fall back to, there is nothing to
    /// move gradually: the final stage starts at once and ignores maxUnavailable.
    fn all_at_once(&self) -> bool {
        self.spec.steps.is_empty() || self.status.stable_version.is_none()
    }

    fn failure(&self) -> Option<String> {
        if self.fresh {
            return None;
        }
        let failed: i32 = self.observation.pools.iter().map(|p| p.failed).sum();
        if failed > 0 {
            let canary = self.status.canary_version.clone().unwrap_or_default();
            return Some(format!(
                "{failed} agent(s) failed to serve {canary}: a load error, a crash or no report \
                 within the stale timeout (see kubectl get edgepools and the agents' logs)"
            ));
        }
        self.observation
            .analysis
            .as_ref()
            .filter(|analysis| analysis.verdict == AnalysisResult::FAIL)
            .map(|analysis| format!("analysis failed: {}", analysis.message))
    }

    fn fail(&mut self, why: String) {
        if self.spec.auto_rollback {
            let stable = self.stable_name();
            self.finish(
                RolloutPhase::RolledBack,
                format!("{why}; rolled back: every agent goes back to {stable}"),
            );
        } else {
            if self.status.phase != Some(RolloutPhase::Degraded) {
                self.event(true, conditions::rollout::DEGRADED, format!("{why}; autoRollback is off: the rollout holds where it is until kubectl shoal promote or abort"));
            }
            self.status.phase = Some(RolloutPhase::Degraded);
            self.status.message = Some(format!(
                "{why}; holding (autoRollback is off): kubectl shoal abort to go back; promote \
                 goes on once no agent is failing"
            ));
            self.hold_pools();
        }
    }

    fn run_steps(&mut self) {
        let steps = self.spec.steps.clone();
        loop {
            let index = self.status.current_step.unwrap_or(0).max(0) as usize;
            let Some(step) = steps.get(index) else {
                self.final_stage();
                return;
            };
            let position = format!("step {}/{}", index + 1, steps.len());
            if let Some(weight) = step.set_weight {
                self.status.weight = Some(weight);
                self.status.phase = Some(RolloutPhase::Progressing);
                let all_ready = self.move_pools(weight);
                if all_ready || self.spend_promote() {
                    self.next_step();
                    continue;
                }
                self.status.message = Some(format!(
                    "{position} setWeight {weight}: {}",
                    self.pool_summary()
                ));
                return;
            }
            self.move_pools(self.weight());
            if let Some(pause) = &step.pause {
                if self.spend_promote() {
                    self.next_step();
                    continue;
                }
                self.status.phase = Some(RolloutPhase::Paused);
                let Some(duration) = pause.duration.as_deref() else {
                    self.status.message = Some(format!(
                        "{position}: paused until promoted (kubectl shoal promote)"
                    ));
                    return;
                };
                let total = parse_duration(duration).unwrap_or(Duration::ZERO);
                let elapsed = self.step_elapsed();
                if elapsed >= total {
                    self.next_step();
                    continue;
                }
                let left = total - elapsed;
                let end = self
                    .observation
                    .now
                    .checked_add(left)
                    .unwrap_or(self.observation.now);
                self.status.message = Some(format!("{position}: pausing {duration} (until {end})"));
                self.requeue = self.requeue.min(left.max(Duration::from_millis(100)));
                return;
            }
            // An analysis step.
            self.status.phase = Some(RolloutPhase::Progressing);
            let passed = !self.fresh
                && self
                    .observation
                    .analysis
                    .as_ref()
                    .is_some_and(|analysis| analysis.verdict == AnalysisResult::PASS);
            if self.spec.analysis.is_none() || passed || self.spend_promote() {
                self.next_step();
                continue;
            }
            let last = self
                .status
                .last_analysis
                .as_ref()
                .map(|a| format!(" (last: {}: {})", a.verdict, a.message))
                .unwrap_or_default();
            self.status.message = Some(format!("{position}: waiting for a passing analysis{last}"));
            return;
        }
    }

    /// After the last step: every agent moves, then the rollout has succeeded.
    fn final_stage(&mut self) {
        self.status.weight = Some(100);
        self.status.phase = Some(RolloutPhase::Progressing);
        if self.move_pools(100) {
            let canary = self.status.canary_version.clone().unwrap_or_default();
            self.finish(
                RolloutPhase::Succeeded,
                format!("every agent serves {canary}"),
            );
        } else {
            self.status.message = Some(format!("moving every agent: {}", self.pool_summary()));
        }
    }

    fn spend_promote(&mut self) -> bool {
        let promote = self.promote;
        if promote {
            self.promote = false;
            let step = self.status.current_step.unwrap_or(0) + 1;
            self.event(
                false,
                conditions::rollout::PROMOTED,
                format!("step {step} skipped by a promote"),
            );
        }
        promote
    }

    fn next_step(&mut self) {
        let next = self.status.current_step.unwrap_or(0) + 1;
        self.status.current_step = Some(next);
        self.status.step_started_at = Some(Time(self.observation.now));
        let total = self.spec.steps.len();
        let message = match self.spec.steps.get(next as usize) {
            Some(step) => format!("now at step {}/{total}: {}", next + 1, describe(step)),
            None => "steps done: moving every agent".to_string(),
        };
        self.event(false, conditions::rollout::STEP_STARTED, message);
    }

    fn step_elapsed(&self) -> Duration {
        let started = self
            .status
            .step_started_at
            .as_ref()
            .map_or(self.observation.now, |t| t.0);
        Duration::try_from(self.observation.now.duration_since(started)).unwrap_or_default()
    }

    fn weight(&self) -> i32 {
        self.status.weight.unwrap_or(0)
    }

    /// Sets each pool's `updated` toward `weight` percent and records its counts;
    /// true when every pool has at least that many agents serving the canary.
    fn move_pools(&mut self, weight: i32) -> bool {
        let all_at_once = self.all_at_once() && weight == 100;
        let mut all_ready = true;
        let mut pools = Vec::with_capacity(self.observation.pools.len());
        for observed in &self.observation.pools {
            let previous = self
                .status
                .pools
                .iter()
                .find(|p| p.pool == observed.pool)
                .map_or(0, |p| p.updated);
            let (ready, failed) = self.counts(observed);
            let target = target_count(weight, observed.agents);
            let allowance = if all_at_once {
                observed.agents.max(1)
            } else {
                max_unavailable(&self.spec.max_unavailable_or_default(), observed.agents)
            };
            let updated = next_updated(previous, target, ready, allowance);
            all_ready &= ready >= target;
            pools.push(PoolProgress {
                pool: observed.pool.clone(),
                agents: observed.agents,
                updated,
                ready,
                failed,
            });
        }
        self.status.pools = pools;
        all_ready
    }

    /// Ready and failed agents of a pool, as far as they concern the current canary.
    fn counts(&self, observed: &PoolObservation) -> (i32, i32) {
        if self.fresh {
            (0, 0)
        } else {
            (observed.ready, observed.failed)
        }
    }

    /// Records the pools' counts without assigning the canary to more agents (a
    /// paused or degraded rollout holds where it is).
    fn hold_pools(&mut self) {
        let pools = self
            .observation
            .pools
            .iter()
            .map(|observed| {
                let previous = self
                    .status
                    .pools
                    .iter()
                    .find(|p| p.pool == observed.pool)
                    .map_or(0, |p| p.updated);
                let (ready, failed) = self.counts(observed);
                PoolProgress {
                    pool: observed.pool.clone(),
                    agents: observed.agents,
                    updated: previous.min(observed.agents).max(0),
                    ready,
                    failed,
                }
            })
            .collect();
        self.status.pools = pools;
    }

    /// Pool counts once the rollout finished: everyone on stable (which is the
    /// canary after a success).
    fn finished_pools(&mut self) {
        let succeeded = self.status.phase == Some(RolloutPhase::Succeeded);
        self.status.pools = self
            .observation
            .pools
            .iter()
            .map(|observed| PoolProgress {
                pool: observed.pool.clone(),
                agents: observed.agents,
                updated: if succeeded { observed.agents } else { 0 },
                ready: observed.ready,
                failed: 0,
            })
            .collect();
    }

    fn pool_summary(&self) -> String {
        let canary = self.status.canary_version.clone().unwrap_or_default();
        self.status
            .pools
            .iter()
            .map(|p| {
                format!(
                    "{} {}/{} agents serve {canary} ({} assigned)",
                    p.pool, p.ready, p.agents, p.updated
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn finish(&mut self, phase: RolloutPhase, message: String) {
        let canary = self.status.canary_version.clone().unwrap_or_default();
        self.record_history(phase, &canary, message.clone());
        if phase == RolloutPhase::Succeeded {
            self.status.stable_version = Some(canary);
        }
        self.status.phase = Some(phase);
        self.status.weight = Some(if phase == RolloutPhase::Succeeded {
            100
        } else {
            0
        });
        self.status.message = Some(message.clone());
        self.finished_pools();
        let (warning, reason) = match phase {
            RolloutPhase::Succeeded => (false, conditions::rollout::SUCCEEDED),
            RolloutPhase::RolledBack => (true, conditions::rollout::ROLLED_BACK),
            _ => (true, conditions::rollout::ABORTED),
        };
        self.event(warning, reason, message);
        self.requeue = IDLE_REQUEUE;
    }

    fn record_history(&mut self, phase: RolloutPhase, version: &str, message: String) {
        self.status.history.push(FinishedRollout {
            version: version.to_string(),
            phase,
            from_version: self.status.stable_version.clone(),
            message: Some(message),
            finished_at: Some(Time(self.observation.now)),
        });
        let excess = self.status.history.len().saturating_sub(HISTORY_LIMIT);
        self.status.history.drain(..excess);
    }

    fn stable_name(&self) -> String {
        self.status
            .stable_version
            .clone()
            .unwrap_or_else(|| "no version".to_string())
    }

    fn set_accepted(&mut self, accepted: bool, reason: &str, message: &str) {
        set_condition(
            &mut self.status.conditions,
            new_condition(
                ACCEPTED,
                ConditionStatus::from(accepted),
                reason,
                message,
                self.status.observed_generation,
                Time(self.observation.now),
            ),
        );
    }

    fn event(&mut self, warning: bool, reason: &'static str, message: String) {
        let action = format!(
            "{reason} {} step {}",
            self.status.canary_version.as_deref().unwrap_or("-"),
            self.status.current_step.unwrap_or(0) + 1
        );
        self.events.push(RolloutEvent {
            warning,
            reason,
            message,
            action,
        });
    }
}

/// "setWeight 20", "pause 30s", "pause until promoted", "analysis".
pub fn describe(step: &RolloutStep) -> String {
    if let Some(weight) = step.set_weight {
        format!("setWeight {weight}")
    } else if let Some(pause) = &step.pause {
        match &pause.duration {
            Some(duration) => format!("pause {duration}"),
            None => "pause until promoted".to_string(),
        }
    } else {
        "analysis".to_string()
    }
}

/// Parses durations as the CRD admits them: 500ms, 30s, 10m, 1h30m.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let value: u32 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, after) = if let Some(after) = rest.strip_prefix("ms") {
            (Duration::from_millis(1), after)
        } else if let Some(after) = rest.strip_prefix('s') {
            (Duration::from_secs(1), after)
        } else if let Some(after) = rest.strip_prefix('m') {
            (Duration::from_secs(60), after)
        } else if let Some(after) = rest.strip_prefix('h') {
            (Duration::from_secs(3600), after)
        } else {
            return None;
        };
        total = total.checked_add(unit.checked_mul(value)?)?;
        rest = after;
    }
    Some(total)
}

#[cfg(test)]
mod tests;
