//! Table-driven tests of the rollout step machine (`decide`).

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use shoal_api::{AnalysisSpec, CohortFigures, PauseStep};

use super::*;

const T0: i64 = 1_800_000_000;

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(T0 + seconds).expect("timestamp")
}

fn at_ms(millis: i64) -> Timestamp {
    Timestamp::from_millisecond(T0 * 1000 + millis).expect("timestamp")
}

/// A spec rolling model `ranker` to `v2` in pools a and b through `steps` (YAML flow).
fn spec(steps: &str) -> ModelRolloutSpec {
    serde_yaml::from_str(&format!(
        "model: ranker\nversion: v2\npools: [a, b]\nsteps: {steps}\n"
    ))
    .expect("spec parses")
}

/// (pool, agents, ready, failed) as observed at `now` seconds after T0.
fn obs(now: i64, pools: &[(&str, i32, i32, i32)]) -> Observation {
    Observation {
        now: at(now),
        target_ready: true,
        inherited_stable: None,
        pools: pools
            .iter()
            .map(|&(pool, agents, ready, failed)| PoolObservation {
                pool: pool.into(),
                agents,
                ready,
                failed,
            })
            .collect(),
        analysis: None,
        action: None,
        conflict: None,
    }
}

/// A rollout of v1 → v2 running at `step` with `weight`, the step started at T0;
/// pools as (pool, agents, updated, ready).
fn running(step: i32, weight: i32, pools: &[(&str, i32, i32, i32)]) -> ModelRolloutStatus {
    ModelRolloutStatus {
        phase: Some(RolloutPhase::Progressing),
        current_step: Some(step),
        step_started_at: Some(Time(at(0))),
        weight: Some(weight),
        stable_version: Some("v1".into()),
        canary_version: Some("v2".into()),
        pools: pools
            .iter()
            .map(|&(pool, agents, updated, ready)| PoolProgress {
                pool: pool.into(),
                agents,
                updated,
                ready,
                failed: 0,
            })
            .collect(),
        ..Default::default()
    }
}

fn with_phase(mut status: ModelRolloutStatus, phase: RolloutPhase) -> ModelRolloutStatus {
    status.phase = Some(phase);
    status
}

fn verdict(verdict: &str, message: &str) -> AnalysisResult {
    AnalysisResult {
        time: None,
        canary: CohortFigures::default(),
        stable: CohortFigures::default(),
        verdict: verdict.into(),
        message: message.into(),
    }
}

fn decide_now(spec: &ModelRolloutSpec, status: &ModelRolloutStatus, obs: &Observation) -> Decision {
    decide(spec, Some(7), Some(status), obs)
}

fn updated(decision: &Decision) -> Vec<i32> {
    decision.status.pools.iter().map(|p| p.updated).collect()
}

fn reasons(decision: &Decision) -> Vec<&'static str> {
    decision.events.iter().map(|e| e.reason).collect()
}

fn message(decision: &Decision) -> &str {
    decision.status.message.as_deref().unwrap_or_default()
}

fn accepted(status: &ModelRolloutStatus) -> (String, String, String) {
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == ACCEPTED)
        .expect("an Accepted condition");
    (
        condition.status.clone(),
        condition.reason.clone(),
        condition.message.clone(),
    )
}

// ---------------------------------------------------------------- start

#[test]
fn start_without_a_stable_version_moves_everyone_at_once() {
    // (steps, inherited stable, expected currentStep, expected "how" in the event)
    let cases: [(&str, Option<&str>, i32, &str); 3] = [
        (
            "[{setWeight: 10}, {pause: {}}, {setWeight: 50}]",
            None,
            3,
            "no version served yet",
        ),
        ("[]", None, 0, "no version served yet"),
        ("[]", Some("v1"), 0, "no steps"),
    ];
    for (steps, inherited, step, how) in cases {
        let spec = spec(steps);
        let mut observation = obs(0, &[("a", 10, 0, 0), ("b", 0, 0, 0), ("c", 1, 0, 0)]);
        observation.inherited_stable = inherited.map(String::from);
        let d = decide(&spec, Some(1), None, &observation);
        let case = format!("{steps} inherited {inherited:?}");
        assert_eq!(d.status.current_step, Some(step), "{case}");
        assert_eq!(d.status.weight, Some(100), "{case}");
        assert_eq!(updated(&d), [10, 0, 1], "{case}: every agent in one pass");
        assert_eq!(d.status.phase, Some(RolloutPhase::Progressing), "{case}");
        assert_eq!(d.status.canary_version.as_deref(), Some("v2"), "{case}");
        assert_eq!(d.status.stable_version.as_deref(), inherited, "{case}");
        assert_eq!(d.status.observed_generation, Some(1));
        assert_eq!(d.events[0].reason, "RolloutStarted", "{case}");
        assert!(!d.events[0].warning);
        assert!(
            d.events[0].message.contains(how),
            "{case}: {}",
            d.events[0].message
        );
        assert_eq!(d.requeue, ACTIVE_REQUEUE);

        // Once every agent serves it, the rollout succeeded.
        let d = decide(
            &spec,
            Some(1),
            Some(&d.status),
            &obs(2, &[("a", 10, 10, 0), ("b", 0, 0, 0), ("c", 1, 1, 0)]),
        );
        assert_eq!(d.status.phase, Some(RolloutPhase::Succeeded), "{case}");
        assert_eq!(d.status.stable_version.as_deref(), Some("v2"), "{case}");
    }
}

#[test]
fn start_with_an_inherited_stable_version_begins_at_step_0() {
    let spec = spec("[{setWeight: 20}, {pause: {}}, {analysis: {}}]");
    let mut observation = obs(0, &[("a", 10, 0, 0), ("b", 4, 0, 0)]);
    observation.inherited_stable = Some("v1".into());
    let d = decide(&spec, Some(1), None, &observation);
    assert_eq!(d.status.current_step, Some(0));
    assert_eq!(d.status.weight, Some(20));
    assert_eq!(d.status.stable_version.as_deref(), Some("v1"));
    assert_eq!(d.status.canary_version.as_deref(), Some("v2"));
    // 20% of 10 = 2 (25% of 10 = 2 at a time); 20% of 4 rounds up to 1.
    assert_eq!(updated(&d), [2, 1]);
    assert_eq!(d.status.step_started_at, Some(Time(at(0))));
    assert_eq!(reasons(&d), ["RolloutStarted"]);
    assert_eq!(
        d.events[0].message,
        "rolling ranker from v1 to v2 (3 steps)"
    );
    assert!(
        message(&d).starts_with("step 1/3 setWeight 20"),
        "{}",
        message(&d)
    );
}

#[test]
fn start_waits_until_the_target_is_ready() {
    let spec = spec("[{setWeight: 20}]");
    let mut observation = obs(0, &[("a", 10, 0, 0)]);
    observation.inherited_stable = Some("v1".into());
    observation.target_ready = false;
    let d = decide(&spec, Some(1), None, &observation);
    assert_eq!(d.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(
        message(&d),
        "waiting for version v2 of Model ranker to become Ready"
    );
    assert_eq!(d.status.canary_version, None);
    assert_eq!(d.status.stable_version.as_deref(), Some("v1"));
    assert!(d.status.pools.is_empty(), "nobody is assigned anything yet");
    assert!(d.events.is_empty());
    assert_eq!(accepted(&d.status).0, "True");

    // Ready in the next pass: starts at step 0 from v1.
    observation.target_ready = true;
    let d = decide(&spec, Some(1), Some(&d.status), &observation);
    assert_eq!(d.status.canary_version.as_deref(), Some("v2"));
    assert_eq!(d.status.current_step, Some(0));
    assert_eq!(reasons(&d), ["RolloutStarted"]);
}

#[test]
fn a_new_version_while_running_supersedes_the_canary() {
    for phase in [
        RolloutPhase::Progressing,
        RolloutPhase::Paused,
        RolloutPhase::Degraded,
    ] {
        let mut spec = spec("[{setWeight: 20}, {pause: {}}, {setWeight: 50}]");
        spec.version = "v3".into();
        let status = with_phase(running(2, 50, &[("a", 10, 5, 5)]), phase);
        // Nothing serves v3 yet (see the ignored test below for counts of v2).
        let d = decide_now(&spec, &status, &obs(60, &[("a", 10, 0, 0)]));
        let last = d.status.history.last().expect("history");
        assert_eq!(last.version, "v2", "{phase:?}");
        assert_eq!(last.phase, RolloutPhase::Aborted);
        assert_eq!(last.from_version.as_deref(), Some("v1"));
        assert_eq!(last.message.as_deref(), Some("superseded by v3"));
        assert_eq!(last.finished_at, Some(Time(at(60))));
        assert_eq!(d.status.canary_version.as_deref(), Some("v3"));
        assert_eq!(d.status.stable_version.as_deref(), Some("v1"));
        assert_eq!(d.status.current_step, Some(0));
        assert_eq!(d.status.weight, Some(20));
        assert_eq!(d.status.phase, Some(RolloutPhase::Progressing));
        // The v2 assignments are dropped, v3 starts from scratch: 2 of 10.
        assert_eq!(updated(&d), [2]);
        assert_eq!(reasons(&d), ["RolloutStarted"]);
        assert!(d.events[0].message.contains("from v1 to v3"));
    }
}

#[test]
fn setting_the_version_back_after_success_undoes() {
    let mut spec = spec("[{setWeight: 20}, {pause: {}}]");
    spec.version = "v1".into();
    let mut status = with_phase(
        running(2, 100, &[("a", 10, 10, 10)]),
        RolloutPhase::Succeeded,
    );
    status.stable_version = Some("v2".into());
    let d = decide_now(&spec, &status, &obs(0, &[("a", 10, 0, 0)]));
    assert_eq!(d.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(d.status.stable_version.as_deref(), Some("v2"));
    assert_eq!(d.status.canary_version.as_deref(), Some("v1"));
    assert_eq!(d.status.current_step, Some(0));
    assert_eq!(d.status.weight, Some(20));
    assert_eq!(updated(&d), [2]);
    assert_eq!(reasons(&d), ["RolloutStarted"]);
    assert!(d.events[0].message.contains("from v2 to v1"));
}

/// The controller counts `ready` and `failed` among the agents of the status'
/// canary, and closes analysis windows for it: in the pass where a new canary
/// starts, those figures are about the previous canary and must not move the new one.
#[test]
fn a_superseding_canary_is_not_judged_by_the_previous_one() {
    // Superseded while 5 agents serve v2: v3's setWeight 20 must not count them.
    let mut spec = spec("[{setWeight: 20}, {pause: {}}, {setWeight: 50}]");
    spec.version = "v3".into();
    let status = running(2, 50, &[("a", 10, 5, 5)]);
    let d = decide_now(&spec, &status, &obs(60, &[("a", 10, 5, 0)]));
    assert_eq!(d.status.current_step, Some(0), "nothing serves v3 yet");
    // ... nor roll v3 back for an agent that failed v2.
    let d = decide_now(&spec, &status, &obs(60, &[("a", 10, 4, 1)]));
    assert_eq!(d.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(d.status.canary_version.as_deref(), Some("v3"));
}

#[test]
fn an_undo_is_not_judged_by_the_previous_canary() {
    // Undo after success: every agent serves v2, none v1; with only setWeight
    // steps the undo must not succeed (and move everyone) in its first pass.
    let mut spec = spec("[{setWeight: 20}, {setWeight: 50}]");
    spec.version = "v1".into();
    let mut status = with_phase(
        running(2, 100, &[("a", 10, 10, 10)]),
        RolloutPhase::Succeeded,
    );
    status.stable_version = Some("v2".into());
    let d = decide_now(&spec, &status, &obs(0, &[("a", 10, 10, 0)]));
    assert_eq!(d.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(d.status.current_step, Some(0));
    assert_eq!(updated(&d), [2]);
}

#[test]
fn a_finished_rollout_stays_finished() {
    let spec = spec("[{setWeight: 20}, {pause: {}}]");
    for phase in [
        RolloutPhase::Succeeded,
        RolloutPhase::RolledBack,
        RolloutPhase::Aborted,
    ] {
        for action in [None, Some(Action::Promote), Some(Action::Abort)] {
            let status = with_phase(running(1, 20, &[("a", 10, 2, 2)]), phase);
            let mut observation = obs(100, &[("a", 10, 3, 1), ("b", 5, 0, 0)]);
            observation.action = action;
            observation.analysis = Some(verdict(AnalysisResult::FAIL, "bad"));
            let d = decide_now(&spec, &status, &observation);
            let case = format!("{phase:?} {action:?}");
            assert_eq!(d.status.phase, Some(phase), "{case}");
            assert_eq!(d.status.current_step, Some(1), "{case}");
            assert_eq!(d.status.canary_version.as_deref(), Some("v2"), "{case}");
            assert_eq!(d.status.stable_version.as_deref(), Some("v1"), "{case}");
            assert!(d.events.is_empty(), "{case}: {:?}", d.events);
            assert!(d.status.history.is_empty(), "{case}");
            assert_eq!(d.requeue, IDLE_REQUEUE, "{case}");
            let everyone = if phase == RolloutPhase::Succeeded {
                [10, 5]
            } else {
                [0, 0]
            };
            assert_eq!(updated(&d), everyone, "{case}");
            assert!(d.status.pools.iter().all(|p| p.failed == 0), "{case}");
        }
    }
}

// ---------------------------------------------------------------- setWeight

#[test]
fn set_weight_moves_at_most_max_unavailable_beyond_ready() {
    // (agents, maxUnavailable, weight, previously updated, ready) → (updated, step done)
    let int = IntOrString::Int;
    let pct = |p: &str| IntOrString::String(p.into());
    let cases: Vec<(i32, IntOrString, i32, i32, i32, i32, bool)> = vec![
        (10, pct("25%"), 50, 0, 0, 2, false),
        (10, pct("25%"), 50, 2, 1, 3, false),
        (10, pct("25%"), 50, 2, 2, 4, false),
        (10, pct("25%"), 50, 4, 4, 5, false),
        (10, pct("25%"), 50, 5, 5, 5, true),
        (10, int(3), 50, 0, 0, 3, false),
        (10, int(3), 50, 3, 1, 4, false),
        (10, int(0), 50, 0, 0, 1, false),
        (10, pct("100%"), 30, 0, 0, 3, false),
        (10, pct("100%"), 31, 0, 0, 4, false),
        (3, pct("25%"), 50, 0, 0, 1, false),
        (3, pct("25%"), 50, 1, 1, 2, false),
        (3, pct("25%"), 50, 2, 2, 2, true),
        (1, pct("25%"), 1, 0, 0, 1, false),
        (0, pct("25%"), 50, 0, 0, 0, true),
        // Ready dropped: what was assigned stays assigned.
        (10, pct("25%"), 50, 4, 0, 4, false),
        (10, int(1), 80, 7, 2, 7, false),
        // Never above the target.
        (10, int(5), 20, 0, 0, 2, false),
        (10, int(5), 20, 5, 5, 2, true),
        // Already ready beyond the target: done at once.
        (10, pct("25%"), 25, 0, 3, 3, true),
    ];
    for (agents, max_unavailable, weight, previous, ready, expected, done) in cases {
        let mut spec = spec(&format!("[{{setWeight: {weight}}}, {{pause: {{}}}}]"));
        spec.max_unavailable = Some(max_unavailable.clone());
        let status = running(0, weight, &[("a", agents, previous, previous)]);
        let d = decide_now(&spec, &status, &obs(1, &[("a", agents, ready, 0)]));
        let case = format!(
            "{agents} agents, maxUnavailable {max_unavailable:?}, weight {weight}, \
             updated {previous}, ready {ready}"
        );
        assert_eq!(updated(&d), [expected], "{case}");
        assert_eq!(d.status.pools[0].ready, ready, "{case}");
        assert_eq!(d.status.weight, Some(weight), "{case}");
        if done {
            assert_eq!(d.status.current_step, Some(1), "{case}");
            assert_eq!(d.status.phase, Some(RolloutPhase::Paused), "{case}");
            assert_eq!(reasons(&d), ["StepStarted"], "{case}");
        } else {
            assert_eq!(d.status.current_step, Some(0), "{case}");
            assert_eq!(d.status.phase, Some(RolloutPhase::Progressing), "{case}");
            assert!(d.events.is_empty(), "{case}");
            assert!(
                message(&d)
                    .starts_with(&format!("step 1/2 setWeight {weight}: a {ready}/{agents}")),
                "{case}: {}",
                message(&d)
            );
        }
        assert_eq!(d.requeue, ACTIVE_REQUEUE, "{case}");
    }
}

#[test]
fn set_weight_completes_only_when_every_pool_is_ready() {
    let spec = spec("[{setWeight: 50}, {pause: {}}]");
    let status = running(0, 50, &[("a", 10, 5, 5), ("b", 4, 2, 1), ("c", 0, 0, 0)]);
    // b needs ceil(50% of 4) = 2 ready.
    for (b_ready, done) in [(0, false), (1, false), (2, true), (3, true)] {
        let d = decide_now(
            &spec,
            &status,
            &obs(1, &[("a", 10, 5, 0), ("b", 4, b_ready, 0), ("c", 0, 0, 0)]),
        );
        let step = if done { 1 } else { 0 };
        assert_eq!(d.status.current_step, Some(step), "b ready {b_ready}");
        assert_eq!(updated(&d), [5, 2, 0], "b ready {b_ready}");
    }
}

#[test]
fn instantaneous_steps_pass_in_one_pass() {
    // setWeight already met, an analysis step without spec.analysis, then a pause.
    let spec = spec("[{setWeight: 20}, {analysis: {}}, {setWeight: 20}, {pause: {}}]");
    let status = running(0, 20, &[("a", 10, 2, 2)]);
    let d = decide_now(&spec, &status, &obs(5, &[("a", 10, 2, 0)]));
    assert_eq!(d.status.current_step, Some(3));
    assert_eq!(d.status.phase, Some(RolloutPhase::Paused));
    assert_eq!(reasons(&d), ["StepStarted", "StepStarted", "StepStarted"]);
    assert_eq!(d.events[0].message, "now at step 2/4: analysis");
    assert_eq!(d.events[2].message, "now at step 4/4: pause until promoted");
    assert_eq!(d.status.step_started_at, Some(Time(at(5))));
    assert_eq!(
        message(&d),
        "step 4/4: paused until promoted (kubectl shoal promote)"
    );
}

// ---------------------------------------------------------------- pause

#[test]
fn timed_pause_ends_at_its_duration() {
    let spec = spec("[{setWeight: 10}, {pause: {duration: 30s}}, {pause: {}}]");
    let status = running(1, 10, &[("a", 10, 1, 1)]);
    // (now in ms since the step started, expected step, expected requeue, message part)
    // The message names the end, not the time left, so it does not change (and the
    // status is not rewritten) on every pass of a pause.
    let end = format!("pausing 30s (until {})", at_ms(30_000));
    let cases: [(i64, i32, Duration, &str); 7] = [
        (0, 1, ACTIVE_REQUEUE, &end),
        (10_000, 1, ACTIVE_REQUEUE, &end),
        (29_000, 1, Duration::from_secs(1), &end),
        (29_500, 1, Duration::from_millis(500), &end),
        (29_990, 1, Duration::from_millis(100), &end),
        (30_000, 2, ACTIVE_REQUEUE, "paused until promoted"),
        (31_000, 2, ACTIVE_REQUEUE, "paused until promoted"),
    ];
    for (now, step, requeue, text) in cases {
        let mut observation = obs(0, &[("a", 10, 1, 0)]);
        observation.now = at_ms(now);
        let d = decide_now(&spec, &status, &observation);
        assert_eq!(d.status.current_step, Some(step), "at {now} ms");
        assert_eq!(d.status.phase, Some(RolloutPhase::Paused), "at {now} ms");
        assert_eq!(d.requeue, requeue, "at {now} ms");
        assert!(message(&d).contains(text), "at {now} ms: {}", message(&d));
        if step == 2 {
            assert_eq!(reasons(&d), ["StepStarted"]);
            assert_eq!(d.status.step_started_at, Some(Time(at_ms(now))));
        } else {
            assert!(d.events.is_empty());
            assert_eq!(d.status.step_started_at, Some(Time(at(0))));
        }
    }
}

#[test]
fn indefinite_pause_waits_for_a_promote_which_skips_one_step() {
    let spec = spec("[{pause: {}}, {pause: {}}, {setWeight: 50}]");
    let mut status = running(0, 0, &[("a", 10, 0, 0)]);
    for hours in [0, 1, 24, 24 * 365] {
        let d = decide_now(&spec, &status, &obs(hours * 3600, &[("a", 10, 0, 0)]));
        assert_eq!(d.status.current_step, Some(0), "after {hours} h");
        assert_eq!(d.status.phase, Some(RolloutPhase::Paused));
        assert_eq!(updated(&d), [0]);
        assert!(d.events.is_empty());
        status = d.status;
    }
    let mut observation = obs(10, &[("a", 10, 0, 0)]);
    observation.action = Some(Action::Promote);
    let d = decide_now(&spec, &status, &observation);
    assert_eq!(d.status.current_step, Some(1), "exactly one step skipped");
    assert_eq!(d.status.phase, Some(RolloutPhase::Paused));
    assert_eq!(reasons(&d), ["Promoted", "StepStarted"]);
    assert_eq!(d.events[0].message, "step 1 skipped by a promote");
    // The next promote goes on to the setWeight step.
    let d = decide_now(&spec, &d.status, &observation);
    assert_eq!(d.status.current_step, Some(2));
    assert_eq!(d.status.weight, Some(50));
    assert_eq!(d.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(updated(&d), [2]);
}

#[test]
fn promote_skips_the_current_step_whatever_it_is() {
    let mut analysed = spec("[{setWeight: 10}, {analysis: {}}, {pause: {}}]");
    analysed.analysis = Some(AnalysisSpec::default());
    // (spec, step, expected step after a promote)
    let cases = [
        (
            spec("[{setWeight: 10}, {pause: {duration: 1h}}, {pause: {}}]"),
            1,
            2,
        ),
        (analysed, 1, 2),
        (spec("[{setWeight: 50}, {pause: {}}]"), 0, 1),
    ];
    for (spec, step, expected) in cases {
        let status = running(step, 10, &[("a", 10, 1, 0)]);
        let mut observation = obs(5, &[("a", 10, 0, 0)]);
        observation.action = Some(Action::Promote);
        let d = decide_now(&spec, &status, &observation);
        assert_eq!(d.status.current_step, Some(expected), "{:?}", spec.steps);
        assert_eq!(
            reasons(&d).iter().filter(|r| **r == "Promoted").count(),
            1,
            "{:?}",
            spec.steps
        );
    }
}

// ---------------------------------------------------------------- analysis

#[test]
fn analysis_step_waits_for_a_pass() {
    let steps = "[{setWeight: 10}, {analysis: {}}, {pause: {}}]";
    let mut gated = spec(steps);
    gated.analysis = Some(AnalysisSpec::default());
    // (spec.analysis present, verdict this pass, expected step)
    let cases: [(bool, Option<&str>, i32); 6] = [
        (true, None, 1),
        (true, Some(AnalysisResult::INCONCLUSIVE), 1),
        (true, Some(AnalysisResult::PASS), 2),
        (false, None, 2),
        (false, Some(AnalysisResult::INCONCLUSIVE), 2),
        (false, Some(AnalysisResult::PASS), 2),
    ];
    for (has_analysis, result, step) in cases {
        let spec = if has_analysis {
            gated.clone()
        } else {
            spec(steps)
        };
        let status = running(1, 10, &[("a", 10, 1, 1)]);
        let mut observation = obs(5, &[("a", 10, 1, 0)]);
        observation.analysis = result.map(|v| verdict(v, "why"));
        let d = decide_now(&spec, &status, &observation);
        let case = format!("analysis {has_analysis}, verdict {result:?}");
        assert_eq!(d.status.current_step, Some(step), "{case}");
        assert_eq!(
            d.status.last_analysis.as_ref().map(|a| a.verdict.as_str()),
            result,
            "{case}"
        );
        if step == 1 {
            assert_eq!(d.status.phase, Some(RolloutPhase::Progressing), "{case}");
            assert!(
                message(&d).starts_with("step 2/3: waiting for a passing analysis"),
                "{case}"
            );
            if let Some(v) = result {
                assert!(
                    message(&d).ends_with(&format!("(last: {v}: why)")),
                    "{case}: {}",
                    message(&d)
                );
            }
        } else {
            assert_eq!(d.status.phase, Some(RolloutPhase::Paused), "{case}");
        }
    }
}

#[test]
fn last_analysis_is_kept_across_passes_without_a_verdict() {
    let mut spec = spec("[{setWeight: 10}, {analysis: {}}]");
    spec.analysis = Some(AnalysisSpec::default());
    let mut status = running(1, 10, &[("a", 10, 1, 1)]);
    status.last_analysis = Some(verdict(AnalysisResult::INCONCLUSIVE, "too few"));
    let d = decide_now(&spec, &status, &obs(5, &[("a", 10, 1, 0)]));
    assert_eq!(d.status.last_analysis, status.last_analysis);
    assert!(message(&d).ends_with("(last: Inconclusive: too few)"));
}

// ---------------------------------------------------------------- failure

/// (description, pool a failed count, verdict, expected words of the reason)
fn failures() -> [(&'static str, i32, Option<AnalysisResult>, &'static str); 3] {
    [
        ("a failed agent", 1, None, "1 agent(s) failed to serve v2"),
        (
            "a failing verdict",
            0,
            Some(verdict(
                AnalysisResult::FAIL,
                "p99 90 ms > maxP99LatencyMs 50",
            )),
            "analysis failed: p99 90 ms > maxP99LatencyMs 50",
        ),
        (
            "both",
            2,
            Some(verdict(AnalysisResult::FAIL, "error rate")),
            "2 agent(s) failed to serve v2",
        ),
    ]
}

#[test]
fn failure_with_auto_rollback_rolls_back() {
    let spec = spec("[{setWeight: 50}, {pause: {}}]");
    for phase in [
        RolloutPhase::Progressing,
        RolloutPhase::Paused,
        RolloutPhase::Degraded,
    ] {
        for (case, failed, analysis, why) in failures() {
            let status = with_phase(running(1, 50, &[("a", 10, 5, 4), ("b", 2, 1, 1)]), phase);
            let mut observation = obs(9, &[("a", 10, 4, failed), ("b", 2, 1, 0)]);
            observation.analysis = analysis;
            let d = decide_now(&spec, &status, &observation);
            let case = format!("{phase:?}: {case}");
            assert_eq!(d.status.phase, Some(RolloutPhase::RolledBack), "{case}");
            assert_eq!(d.status.weight, Some(0), "{case}");
            assert_eq!(updated(&d), [0, 0], "{case}");
            assert_eq!(d.status.stable_version.as_deref(), Some("v1"), "{case}");
            let last = d.status.history.last().expect("history");
            assert_eq!(last.version, "v2");
            assert_eq!(last.phase, RolloutPhase::RolledBack);
            assert_eq!(last.from_version.as_deref(), Some("v1"));
            assert_eq!(last.finished_at, Some(Time(at(9))));
            assert_eq!(reasons(&d), ["RolledBack"], "{case}");
            let event = &d.events[0];
            assert!(event.warning, "{case}");
            assert!(event.message.contains(why), "{case}: {}", event.message);
            assert!(
                event
                    .message
                    .ends_with("rolled back: every agent goes back to v1"),
                "{case}"
            );
            assert_eq!(last.message.as_deref(), Some(event.message.as_str()));
            assert_eq!(d.requeue, IDLE_REQUEUE, "{case}");
        }
    }
}

#[test]
fn failure_without_auto_rollback_degrades_then_promote_or_abort() {
    let mut spec = spec("[{setWeight: 50}, {pause: {}}, {setWeight: 80}]");
    spec.auto_rollback = false;
    for (case, failed, analysis, why) in failures() {
        // Pool a is done with setWeight 50 (5 of 10 assigned): updated cannot grow.
        let status = with_phase(running(1, 50, &[("a", 10, 5, 5)]), RolloutPhase::Paused);
        let mut observation = obs(9, &[("a", 10, 5 - failed, failed)]);
        observation.analysis = analysis.clone();
        let d = decide_now(&spec, &status, &observation);
        assert_eq!(d.status.phase, Some(RolloutPhase::Degraded), "{case}");
        assert_eq!(updated(&d), [5], "{case}: updated kept");
        assert_eq!(d.status.weight, Some(50), "{case}");
        assert_eq!(d.status.current_step, Some(1), "{case}");
        assert_eq!(reasons(&d), ["Degraded"], "{case}");
        assert!(d.events[0].warning);
        assert!(
            d.events[0].message.contains(why),
            "{case}: {}",
            d.events[0].message
        );
        assert!(message(&d).contains(why), "{case}");
        assert!(d.status.history.is_empty());

        // Still failing: still Degraded, no second event.
        let again = decide_now(&spec, &d.status, &observation);
        assert_eq!(again.status.phase, Some(RolloutPhase::Degraded), "{case}");
        assert!(again.events.is_empty(), "{case}: {:?}", again.events);
        // No failure any more, no action: holds Degraded, quietly.
        let quiet = decide_now(&spec, &d.status, &obs(12, &[("a", 10, 5, 0)]));
        assert_eq!(quiet.status.phase, Some(RolloutPhase::Degraded), "{case}");
        assert_eq!(quiet.status.current_step, Some(1));
        assert_eq!(updated(&quiet), [5]);
        assert!(quiet.events.is_empty(), "{case}");

        // A promote leaves Degraded and advances one step.
        let mut promote = obs(20, &[("a", 10, 5, 0)]);
        promote.action = Some(Action::Promote);
        let promoted = decide_now(&spec, &quiet.status, &promote);
        assert_eq!(
            promoted.status.phase,
            Some(RolloutPhase::Progressing),
            "{case}"
        );
        assert_eq!(promoted.status.current_step, Some(2), "{case}");
        assert_eq!(promoted.status.weight, Some(80));
        assert_eq!(reasons(&promoted), ["Promoted", "StepStarted"], "{case}");

        // An abort instead sends everyone back.
        let mut abort = obs(20, &[("a", 10, 5, 0)]);
        abort.action = Some(Action::Abort);
        let aborted = decide_now(&spec, &quiet.status, &abort);
        assert_eq!(aborted.status.phase, Some(RolloutPhase::Aborted), "{case}");
        assert_eq!(updated(&aborted), [0]);
    }
}

#[test]
fn degraded_holds_its_assignments() {
    let mut spec = spec("[{setWeight: 50}, {pause: {}}]");
    spec.auto_rollback = false;
    // setWeight 50 of 10: 2 assigned, 1 serving, 1 failed.
    let status = running(0, 50, &[("a", 10, 2, 1)]);
    let d = decide_now(&spec, &status, &obs(1, &[("a", 10, 1, 1)]));
    assert_eq!(d.status.phase, Some(RolloutPhase::Degraded));
    assert_eq!(
        updated(&d),
        [2],
        "a failing version must not reach more agents"
    );
    // Later passes while Degraded (failure gone or not) hold as well.
    let d = decide_now(&spec, &d.status, &obs(2, &[("a", 10, 2, 0)]));
    assert_eq!(updated(&d), [2], "Degraded holds where it is");
}

/// A promote cannot outvote agents that are failing right now: it would only degrade
/// again on the next pass. The person aborts, or fixes the agents first.
#[test]
fn promote_does_not_leave_degraded_while_agents_still_fail() {
    let mut spec = spec("[{setWeight: 50}, {pause: {}}, {setWeight: 80}]");
    spec.auto_rollback = false;
    let status = with_phase(running(1, 50, &[("a", 10, 5, 4)]), RolloutPhase::Degraded);
    let mut observation = obs(1, &[("a", 10, 4, 1)]);
    observation.action = Some(Action::Promote);
    let d = decide_now(&spec, &status, &observation);
    assert_eq!(d.status.phase, Some(RolloutPhase::Degraded));
    assert_eq!(updated(&d), [5], "holds its assignments");
    assert!(
        d.status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("once no agent is failing")),
        "{:?}",
        d.status.message
    );
}

// ---------------------------------------------------------------- abort

#[test]
fn abort_while_running_goes_back_to_stable() {
    let spec = spec("[{setWeight: 50}, {pause: {}}]");
    for phase in [
        RolloutPhase::Progressing,
        RolloutPhase::Paused,
        RolloutPhase::Degraded,
    ] {
        let status = with_phase(running(1, 50, &[("a", 10, 5, 5)]), phase);
        let mut observation = obs(3, &[("a", 10, 5, 0)]);
        observation.action = Some(Action::Abort);
        let d = decide_now(&spec, &status, &observation);
        assert_eq!(d.status.phase, Some(RolloutPhase::Aborted), "{phase:?}");
        assert_eq!(d.status.weight, Some(0));
        assert_eq!(updated(&d), [0]);
        assert_eq!(d.status.stable_version.as_deref(), Some("v1"));
        assert_eq!(reasons(&d), ["Aborted"]);
        assert!(d.events[0].warning);
        assert_eq!(
            d.events[0].message,
            "aborted by a person; every agent goes back to v1"
        );
        let last = d.status.history.last().expect("history");
        assert_eq!(
            (
                last.version.as_str(),
                last.phase,
                last.from_version.as_deref()
            ),
            ("v2", RolloutPhase::Aborted, Some("v1"))
        );
        assert_eq!(d.requeue, IDLE_REQUEUE);
        // And it stays aborted.
        let d = decide_now(&spec, &d.status, &obs(4, &[("a", 10, 0, 0)]));
        assert_eq!(d.status.phase, Some(RolloutPhase::Aborted));
        assert!(d.events.is_empty());
    }
}

#[test]
fn abort_while_a_new_version_waits_to_be_ready() {
    let mut spec = spec("[{setWeight: 50}, {pause: {}}]");
    spec.version = "v3".into();
    let status = running(1, 50, &[("a", 10, 5, 5)]);
    let mut observation = obs(3, &[("a", 10, 5, 0)]);
    observation.target_ready = false;
    observation.action = Some(Action::Abort);
    let d = decide_now(&spec, &status, &observation);
    assert_eq!(d.status.phase, Some(RolloutPhase::Aborted));
    assert_eq!(updated(&d), [0]);
}

// ---------------------------------------------------------------- spec.paused

#[test]
fn spec_paused_holds_and_resumes_from_the_same_step() {
    let mut spec = spec("[{setWeight: 50}, {pause: {duration: 10s}}, {setWeight: 80}]");
    spec.paused = true;
    // setWeight 50 is met, the next step is a timed pause, long over: nothing moves.
    let status = running(0, 50, &[("a", 10, 5, 5)]);
    let mut observation = obs(3600, &[("a", 10, 5, 0)]);
    let d = decide_now(&spec, &status, &observation);
    assert_eq!(d.status.phase, Some(RolloutPhase::Paused));
    assert_eq!(d.status.current_step, Some(0));
    assert_eq!(d.status.weight, Some(50));
    assert_eq!(updated(&d), [5]);
    assert!(d.events.is_empty());
    assert_eq!(
        message(&d),
        "paused by spec.paused; resume with kubectl shoal resume"
    );
    // A promote does not move it either.
    observation.action = Some(Action::Promote);
    let d = decide_now(&spec, &d.status, &observation);
    assert_eq!(d.status.current_step, Some(0));
    observation.action = None;

    spec.paused = false;
    let d = decide_now(&spec, &d.status, &observation);
    assert_eq!(
        d.status.current_step,
        Some(1),
        "resumes at step 0, which is done"
    );
    assert_eq!(
        d.status.phase,
        Some(RolloutPhase::Paused),
        "the 10s pause starts now"
    );
    assert_eq!(reasons(&d), ["StepStarted"]);
}

#[test]
fn spec_paused_assigns_no_more_agents() {
    let mut spec = spec("[{setWeight: 50}, {pause: {}}]");
    spec.paused = true;
    let status = running(0, 50, &[("a", 10, 2, 2)]);
    let d = decide_now(&spec, &status, &obs(1, &[("a", 10, 2, 0)]));
    assert_eq!(d.status.phase, Some(RolloutPhase::Paused));
    assert_eq!(updated(&d), [2], "held where it is");
}

// ---------------------------------------------------------------- final stage

#[test]
fn final_stage_moves_everyone_then_succeeds() {
    let spec = spec("[{setWeight: 50}]");
    let status = running(1, 50, &[("a", 10, 5, 5), ("b", 0, 0, 0)]);
    let d = decide_now(&spec, &status, &obs(1, &[("a", 10, 5, 0), ("b", 0, 0, 0)]));
    assert_eq!(d.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(d.status.weight, Some(100));
    assert_eq!(updated(&d), [7, 0], "25% of 10 beyond ready");
    assert!(
        message(&d).starts_with("moving every agent: a 5/10"),
        "{}",
        message(&d)
    );
    let d = decide_now(
        &spec,
        &d.status,
        &obs(2, &[("a", 10, 9, 0), ("b", 0, 0, 0)]),
    );
    assert_eq!(d.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(updated(&d), [10, 0]);
    let d = decide_now(
        &spec,
        &d.status,
        &obs(3, &[("a", 10, 10, 0), ("b", 0, 0, 0)]),
    );
    assert_eq!(d.status.phase, Some(RolloutPhase::Succeeded));
    assert_eq!(d.status.stable_version.as_deref(), Some("v2"));
    assert_eq!(d.status.canary_version.as_deref(), Some("v2"));
    assert_eq!(d.status.weight, Some(100));
    assert_eq!(updated(&d), [10, 0]);
    assert_eq!(reasons(&d), ["Succeeded"]);
    assert!(!d.events[0].warning);
    assert_eq!(d.events[0].message, "every agent serves v2");
    let last = d.status.history.last().expect("history");
    assert_eq!(
        (
            last.version.as_str(),
            last.phase,
            last.from_version.as_deref()
        ),
        ("v2", RolloutPhase::Succeeded, Some("v1"))
    );
    assert_eq!(d.requeue, IDLE_REQUEUE);
}

#[test]
fn history_is_bounded() {
    let spec = spec("[{setWeight: 50}]");
    let mut status = running(1, 100, &[("a", 2, 2, 2)]);
    status.history = (0..HISTORY_LIMIT)
        .map(|i| FinishedRollout {
            version: format!("old{i}"),
            phase: RolloutPhase::Succeeded,
            ..Default::default()
        })
        .collect();
    let d = decide_now(&spec, &status, &obs(1, &[("a", 2, 2, 0)]));
    assert_eq!(d.status.phase, Some(RolloutPhase::Succeeded));
    assert_eq!(d.status.history.len(), HISTORY_LIMIT);
    assert_eq!(d.status.history[0].version, "old1", "the oldest went");
    assert_eq!(d.status.history[HISTORY_LIMIT - 1].version, "v2");
}

// ---------------------------------------------------------------- conflict

#[test]
fn conflict_is_not_accepted_and_moves_nothing() {
    let spec = spec("[{setWeight: 50}, {pause: {}}]");
    let status = running(0, 50, &[("a", 10, 2, 2)]);
    for action in [None, Some(Action::Promote), Some(Action::Abort)] {
        let mut observation = obs(5, &[("a", 10, 10, 3)]);
        observation.conflict = Some("rollout other holds ranker in pool a".into());
        observation.analysis = Some(verdict(AnalysisResult::FAIL, "bad"));
        observation.action = action;
        let d = decide(&spec, Some(4), Some(&status), &observation);
        assert_eq!(
            accepted(&d.status),
            (
                "False".into(),
                "Conflict".into(),
                "rollout other holds ranker in pool a".into()
            )
        );
        assert_eq!(message(&d), "rollout other holds ranker in pool a");
        assert_eq!(d.status.observed_generation, Some(4));
        let mut unchanged = d.status.clone();
        unchanged.conditions.clear();
        unchanged.message = None;
        unchanged.observed_generation = None;
        assert_eq!(unchanged, status, "{action:?}");
        assert!(d.events.is_empty());
        assert_eq!(d.requeue, IDLE_REQUEUE);
    }
    // Without the conflict: accepted.
    let d = decide(&spec, Some(4), Some(&status), &obs(5, &[("a", 10, 2, 0)]));
    let (condition, reason, _) = accepted(&d.status);
    assert_eq!((condition.as_str(), reason.as_str()), ("True", "Accepted"));
    assert_eq!(d.status.conditions[0].observed_generation, Some(4));
}

// ---------------------------------------------------------------- invariants

/// The weight a running rollout must show at `step`.
fn expected_weight(spec: &ModelRolloutSpec, step: i32) -> i32 {
    let step = step as usize;
    if step >= spec.steps.len() {
        return 100;
    }
    spec.steps[..=step]
        .iter()
        .filter_map(|s| s.set_weight)
        .next_back()
        .unwrap_or(0)
}

#[test]
fn a_long_simulated_run_keeps_the_invariants() {
    let mut spec = spec(
        "[{setWeight: 5}, {pause: {duration: 30s}}, {setWeight: 25}, {analysis: {}}, \
          {pause: {}}, {setWeight: 25}, {setWeight: 60}, {pause: {duration: 1m}}, \
          {analysis: {}}, {setWeight: 90}]",
    );
    spec.analysis = Some(AnalysisSpec::default());
    spec.max_unavailable = Some(IntOrString::String("20%".into()));
    let pools = [("a", 37), ("b", 4), ("c", 0), ("d", 1)];
    let plans = [("v1", "v2"), ("v2", "v3"), ("v3", "v4")];

    let mut status: Option<ModelRolloutStatus> = None;
    let mut now = 0;
    let mut promotes = 0;
    let mut passes = 0;
    for (round, (stable, canary)) in plans.into_iter().enumerate() {
        spec.version = canary.into();
        let versions: BTreeSet<&str> = [stable, canary].into();
        let mut last_step = -1;
        let mut finished = false;
        for pass in 0..400 {
            passes += 1;
            now += 7;
            let previous = status.clone().unwrap_or_default();
            let mut observation = obs(now, &[]);
            observation.inherited_stable = Some("v1".into());
            observation.pools = pools
                .iter()
                .map(|&(pool, agents)| PoolObservation {
                    pool: pool.into(),
                    agents,
                    // Agents serve what they were assigned one pass later.
                    ready: previous
                        .pools
                        .iter()
                        .find(|p| p.pool == pool)
                        .filter(|_| previous.canary_version.as_deref() == Some(canary))
                        .map_or(0, |p| p.updated),
                    failed: 0,
                })
                .collect();
            observation.analysis = match pass % 5 {
                3 => Some(verdict(AnalysisResult::INCONCLUSIVE, "too few")),
                4 => Some(verdict(AnalysisResult::PASS, "fine")),
                _ => None,
            };
            if previous.phase == Some(RolloutPhase::Paused) && pass % 3 == 0 {
                observation.action = Some(Action::Promote);
                promotes += 1;
            }
            // The third rollout is aborted halfway.
            if round == 2 && previous.current_step == Some(6) {
                observation.action = Some(Action::Abort);
            }
            let d = decide(&spec, Some(1), status.as_ref(), &observation);
            let s = &d.status;
            let case = format!("round {round} pass {pass}: {s:?}");
            for p in &s.pools {
                assert!(p.updated >= 0 && p.updated <= p.agents, "{case}");
            }
            for version in [&s.stable_version, &s.canary_version].into_iter().flatten() {
                assert!(versions.contains(version.as_str()), "{case}");
            }
            let step = s.current_step.expect("a step");
            assert!(step >= last_step, "{case}: step went back from {last_step}");
            last_step = step;
            match s.phase.expect("a phase") {
                RolloutPhase::Progressing | RolloutPhase::Paused => {
                    assert_eq!(s.weight, Some(expected_weight(&spec, step)), "{case}");
                    assert_eq!(s.canary_version.as_deref(), Some(canary), "{case}");
                    assert_eq!(s.stable_version.as_deref(), Some(stable), "{case}");
                    assert!(d.requeue <= ACTIVE_REQUEUE, "{case}");
                }
                RolloutPhase::Succeeded => {
                    assert_eq!(s.weight, Some(100));
                    assert_eq!(s.stable_version.as_deref(), Some(canary), "{case}");
                    finished = true;
                }
                RolloutPhase::Aborted => {
                    assert_eq!(round, 2, "{case}");
                    assert_eq!(s.weight, Some(0));
                    assert!(s.pools.iter().all(|p| p.updated == 0), "{case}");
                    finished = true;
                }
                other => panic!("{case}: unexpected {other:?}"),
            }
            status = Some(d.status);
            if finished {
                break;
            }
        }
        assert!(finished, "round {round} finished within 400 passes");
        if round == 2 {
            // Aborted: v3 stays stable; history holds every rollout in order.
            let s = status.as_ref().expect("status");
            let history: Vec<(&str, RolloutPhase)> = s
                .history
                .iter()
                .map(|h| (h.version.as_str(), h.phase))
                .collect();
            assert_eq!(
                history,
                [
                    ("v2", RolloutPhase::Succeeded),
                    ("v3", RolloutPhase::Succeeded),
                    ("v4", RolloutPhase::Aborted)
                ]
            );
            assert_eq!(s.stable_version.as_deref(), Some("v3"));
        }
    }
    assert!(promotes >= 2, "the run saw promotes ({promotes})");
    assert!(passes > 30, "a long run ({passes} passes)");
}

// ---------------------------------------------------------------- helpers

#[test]
fn parse_duration_table() {
    let cases: [(&str, Option<Duration>); 16] = [
        ("500ms", Some(Duration::from_millis(500))),
        ("30s", Some(Duration::from_secs(30))),
        ("10m", Some(Duration::from_secs(600))),
        ("2h", Some(Duration::from_secs(7200))),
        ("1h30m", Some(Duration::from_secs(5400))),
        ("1m1s500ms", Some(Duration::from_millis(61_500))),
        ("0s", Some(Duration::ZERO)),
        (" 5s ", Some(Duration::from_secs(5))),
        ("", None),
        ("30", None),
        ("s", None),
        ("5d", None),
        ("-5s", None),
        ("1.5s", None),
        ("5 s", None),
        ("1h30", None),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_duration(text), expected, "{text:?}");
    }
}

#[test]
fn parse_duration_does_not_truncate_large_values() {
    // The CRD admits up to 32 characters of ^([0-9]+(ms|s|m|h))+$.
    let parsed = parse_duration("5000000000s");
    assert!(
        parsed.is_none() || parsed == Some(Duration::from_secs(5_000_000_000)),
        "{parsed:?}"
    );
}

#[test]
fn describe_table() {
    let step = |yaml: &str| -> RolloutStep { serde_yaml::from_str(yaml).expect("step") };
    let cases = [
        (step("{setWeight: 20}"), "setWeight 20"),
        (step("{pause: {duration: 30s}}"), "pause 30s"),
        (step("{pause: {}}"), "pause until promoted"),
        (step("{analysis: {}}"), "analysis"),
        (
            RolloutStep {
                pause: Some(PauseStep {
                    duration: Some("1h30m".into()),
                }),
                ..Default::default()
            },
            "pause 1h30m",
        ),
    ];
    for (step, expected) in cases {
        assert_eq!(describe(&step), expected);
    }
}
