//! The decisions behind `promote`, `abort`, `pause`, `resume` and `undo`, and the
//! merge patches that carry them out. Pure: the caller fetches and patches.

use anyhow::{Result, bail};
use kube::ResourceExt;
use serde_json::{Value, json};
use shoal_api::{ACTION_ABORT, ACTION_ANNOTATION, ACTION_PROMOTE, ModelRollout, RolloutPhase};

use crate::status_view::phase;

/// An action the operator carries out through the `shoal.dev/action` annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Skip the current pause or analysis step (or leave Degraded).
    Promote,
    /// Send every agent back to the stable version.
    Abort,
}

impl Action {
    /// The annotation value.
    pub fn value(self) -> &'static str {
        match self {
            Self::Promote => ACTION_PROMOTE,
            Self::Abort => ACTION_ABORT,
        }
    }
}

/// Checks that `action` makes sense now: refuses on a finished rollout.
pub fn check_action(rollout: &ModelRollout, action: Action) -> Result<()> {
    let name = rollout.name_any();
    if let Some(phase) = phase(rollout).filter(|p| p.is_finished()) {
        let what = match action {
            Action::Promote => "nothing to promote",
            Action::Abort => "nothing to abort",
        };
        bail!(
            "rollout {name} has finished ({phase:?}, version {}): {what}; \
             change spec.version to start a new rollout, or use kubectl shoal undo",
            rollout.spec.version
        );
    }
    Ok(())
}

/// The merge patch that requests `action`.
pub fn action_patch(action: Action) -> Value {
    json!({ "metadata": { "annotations": { ACTION_ANNOTATION: action.value() } } })
}

/// The merge patch that sets spec.paused.
pub fn paused_patch(paused: bool) -> Value {
    json!({ "spec": { "paused": paused } })
}

/// Where `undo` goes: the `fromVersion` of the last Succeeded history entry. Returns
/// (target version, current spec.version). Refuses while a rollout runs.
pub fn undo_target(rollout: &ModelRollout) -> Result<(String, String)> {
    let name = rollout.name_any();
    let current = rollout.spec.version.clone();
    if let Some(
        phase @ (RolloutPhase::Progressing | RolloutPhase::Paused | RolloutPhase::Degraded),
    ) = phase(rollout)
    {
        bail!(
            "rollout {name} is running ({phase:?}, version {current}): \
             use kubectl shoal abort to go back to the stable version"
        );
    }
    let history = rollout
        .status
        .as_ref()
        .map(|s| s.history.as_slice())
        .unwrap_or_default();
    let Some(last) = history
        .iter()
        .rev()
        .find(|entry| entry.phase == RolloutPhase::Succeeded)
    else {
        bail!("rollout {name} has no succeeded rollout in its history: nothing to undo");
    };
    let Some(target) = last.from_version.clone() else {
        bail!(
            "rollout {name}: the last succeeded rollout (version {}) does not record \
             the version it started from: nothing to undo",
            last.version
        );
    };
    if target == current {
        bail!("rollout {name} already targets version {target}: nothing to undo");
    }
    Ok((target, current))
}

/// The merge patch that sets spec.version, guarded by the resourceVersion that was
/// read so that a concurrent change makes it fail instead of being overwritten.
pub fn version_patch(version: &str, resource_version: Option<&str>) -> Value {
    let mut patch = json!({ "spec": { "version": version } });
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({ "resourceVersion": rv });
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::{FinishedRollout, ModelRolloutSpec, ModelRolloutStatus};

    fn rollout(phase: Option<RolloutPhase>, history: Vec<FinishedRollout>) -> ModelRollout {
        let mut r = ModelRollout::new(
            "r",
            ModelRolloutSpec {
                model: "m".into(),
                version: "1.1.0".into(),
                pools: vec!["p".into()],
                steps: vec![],
                analysis: None,
                max_unavailable: None,
                auto_rollback: true,
                paused: false,
            },
        );
        r.status = Some(ModelRolloutStatus {
            phase,
            history,
            ..ModelRolloutStatus::default()
        });
        r
    }

    fn entry(version: &str, phase: RolloutPhase, from: Option<&str>) -> FinishedRollout {
        FinishedRollout {
            version: version.into(),
            phase,
            from_version: from.map(str::to_owned),
            ..FinishedRollout::default()
        }
    }

    #[test]
    fn refuses_actions_on_finished_rollouts() {
        for phase in [
            RolloutPhase::Succeeded,
            RolloutPhase::RolledBack,
            RolloutPhase::Aborted,
        ] {
            let r = rollout(Some(phase), vec![]);
            let error = check_action(&r, Action::Promote).expect_err("refused");
            assert!(error.to_string().contains("nothing to promote"), "{error}");
            let error = check_action(&r, Action::Abort).expect_err("refused");
            assert!(error.to_string().contains("nothing to abort"), "{error}");
        }
        for phase in [
            Some(RolloutPhase::Progressing),
            Some(RolloutPhase::Paused),
            Some(RolloutPhase::Degraded),
            None,
        ] {
            let r = rollout(phase, vec![]);
            assert!(check_action(&r, Action::Promote).is_ok());
            assert!(check_action(&r, Action::Abort).is_ok());
        }
    }

    #[test]
    fn patches() {
        assert_eq!(
            action_patch(Action::Promote),
            json!({"metadata": {"annotations": {"shoal.dev/action": "promote"}}})
        );
        assert_eq!(
            action_patch(Action::Abort),
            json!({"metadata": {"annotations": {"shoal.dev/action": "abort"}}})
        );
        assert_eq!(paused_patch(true), json!({"spec": {"paused": true}}));
        assert_eq!(
            version_patch("1.0.0", Some("42")),
            json!({"spec": {"version": "1.0.0"}, "metadata": {"resourceVersion": "42"}})
        );
        assert_eq!(
            version_patch("1.0.0", None),
            json!({"spec": {"version": "1.0.0"}})
        );
    }

    #[test]
    fn undo_goes_to_the_last_succeeded_from_version() {
        let r = rollout(
            Some(RolloutPhase::RolledBack),
            vec![
                entry("1.0.0", RolloutPhase::Succeeded, Some("0.9.0")),
                entry("1.1.0", RolloutPhase::Succeeded, Some("1.0.0")),
                entry("1.2.0", RolloutPhase::RolledBack, Some("1.1.0")),
            ],
        );
        let mut r = r;
        r.spec.version = "1.2.0".into();
        assert_eq!(
            undo_target(&r).expect("target"),
            ("1.0.0".to_owned(), "1.2.0".to_owned())
        );
    }

    #[test]
    fn undo_refuses_while_running() {
        let history = vec![entry("1.1.0", RolloutPhase::Succeeded, Some("1.0.0"))];
        for phase in [
            RolloutPhase::Progressing,
            RolloutPhase::Paused,
            RolloutPhase::Degraded,
        ] {
            let error = undo_target(&rollout(Some(phase), history.clone())).expect_err("refused");
            assert!(error.to_string().contains("is running"), "{error}");
        }
    }

    #[test]
    fn undo_errors_without_a_target() {
        let error = undo_target(&rollout(Some(RolloutPhase::Aborted), vec![])).expect_err("none");
        assert!(
            error.to_string().contains("no succeeded rollout"),
            "{error}"
        );
        let history = vec![entry("1.1.0", RolloutPhase::Aborted, Some("1.0.0"))];
        let error = undo_target(&rollout(Some(RolloutPhase::Aborted), history)).expect_err("none");
        assert!(
            error.to_string().contains("no succeeded rollout"),
            "{error}"
        );
        let history = vec![entry("1.1.0", RolloutPhase::Succeeded, None)];
        let error =
            undo_target(&rollout(Some(RolloutPhase::Succeeded), history)).expect_err("none");
        assert!(error.to_string().contains("does not record"), "{error}");
        let history = vec![entry("1.1.0", RolloutPhase::Succeeded, Some("1.1.0"))];
        let error =
            undo_target(&rollout(Some(RolloutPhase::Succeeded), history)).expect_err("same");
        assert!(error.to_string().contains("already targets"), "{error}");
    }
}
