//! Pure rendering of ModelRollouts: the `get` table, the `status` view and their
//! pieces. Every function takes the object and the current time and returns text, so
//! that all of it is unit-tested without a cluster.

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::{Value, json};
use shoal_api::{ModelRollout, PoolProgress, RolloutPhase, RolloutStep};

use crate::table;

/// Width, in characters, of the progress bar between its brackets.
pub const BAR_WIDTH: usize = 10;
/// How many history entries `status` shows.
pub const HISTORY_SHOWN: usize = 5;
/// Placeholder for a value that is not known (yet).
const NONE: &str = "-";

/// Age of something that happened `seconds` ago, the way `kubectl get` shows it:
/// `45s`, `3m20s`, `25m`, `5h10m`, `3d4h`, `40d`, `2y30d`.
pub fn human_age(seconds: i64) -> String {
    if seconds < 0 {
        return "0s".to_owned();
    }
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    let days = hours / 24;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        two_units(minutes, "m", seconds % 60, "s")
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        two_units(hours, "h", minutes % 60, "m")
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 192 {
        two_units(days, "d", hours % 24, "h")
    } else if days < 365 * 2 {
        format!("{days}d")
    } else if days < 365 * 8 {
        two_units(days / 365, "y", days % 365, "d")
    } else {
        format!("{}y", days / 365)
    }
}

fn two_units(big: i64, big_unit: &str, small: i64, small_unit: &str) -> String {
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit}{small}{small_unit}")
    }
}

/// A time span as hours, minutes and seconds, leaving out zero parts: `12s`,
/// `1m30s`, `2h`, `1h0m5s` is written `1h5s`.
pub fn short_duration(seconds: i64) -> String {
    let seconds = seconds.max(0);
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if m > 0 {
        let _ = write!(out, "{m}m");
    }
    if s > 0 || out.is_empty() {
        let _ = write!(out, "{s}s");
    }
    out
}

/// Parses a step duration as the CRD allows it (`30s`, `10m`, `1h30m`, `500ms`) into
/// milliseconds. None when it is not one.
pub fn parse_duration_ms(text: &str) -> Option<i64> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: i64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let number: i64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, unit_len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return None;
        };
        total = total.checked_add(number.checked_mul(unit_ms)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

fn seconds_since(time: &Timestamp, now: Timestamp) -> i64 {
    now.as_second() - time.as_second()
}

/// A step in words: `setWeight 20`, `pause 30s`, `pause (until promoted)`, `analysis`.
pub fn describe_step(step: &RolloutStep) -> String {
    if let Some(weight) = step.set_weight {
        format!("setWeight {weight}")
    } else if let Some(pause) = &step.pause {
        match &pause.duration {
            Some(duration) => format!("pause {duration}"),
            None => "pause (until promoted)".to_owned(),
        }
    } else if step.analysis.is_some() {
        "analysis".to_owned()
    } else {
        "(empty step)".to_owned()
    }
}

/// The rollout's phase, `-` before the operator has written one.
pub fn phase_text(rollout: &ModelRollout) -> String {
    match rollout.status.as_ref().and_then(|s| s.phase) {
        Some(phase) => format!("{phase:?}"),
        None => NONE.to_owned(),
    }
}

/// The phase, or None before the operator has written one.
pub fn phase(rollout: &ModelRollout) -> Option<RolloutPhase> {
    rollout.status.as_ref().and_then(|s| s.phase)
}

/// True when the rollout will not move any more (Succeeded, RolledBack, Aborted).
pub fn is_finished(rollout: &ModelRollout) -> bool {
    phase(rollout).is_some_and(RolloutPhase::is_finished)
}

/// The step column of `get`: `3/5` (1-based), `done` after the last step, `-`.
pub fn step_short(rollout: &ModelRollout) -> String {
    let total = rollout.spec.steps.len();
    match rollout.status.as_ref().and_then(|s| s.current_step) {
        _ if total == 0 => NONE.to_owned(),
        Some(index) if index >= 0 && (index as usize) < total => {
            format!("{}/{total}", index + 1)
        }
        Some(index) if index >= 0 => format!("{total}/{total}"),
        _ => NONE.to_owned(),
    }
}

/// The current step in words, for `status`:
/// `3/5: pause 30s (12s left)`, `2/5: setWeight 20`,
/// `after step 5/5: moving the remaining agents`.
pub fn step_line(rollout: &ModelRollout, now: Timestamp) -> String {
    let steps = &rollout.spec.steps;
    let total = steps.len();
    let status = rollout.status.as_ref();
    if total == 0 {
        return "no steps: every agent moves to the new version at once".to_owned();
    }
    let Some(index) = status.and_then(|s| s.current_step).filter(|i| *i >= 0) else {
        return format!("not started ({total} steps)");
    };
    let index = index as usize;
    if index >= total {
        return if is_finished(rollout) {
            format!("{total}/{total}: all steps done")
        } else {
            format!("after step {total}/{total}: moving the remaining agents")
        };
    }
    let step = &steps[index];
    let mut line = format!("{}/{total}: {}", index + 1, describe_step(step));
    if is_finished(rollout) {
        return line;
    }
    let duration_ms = step
        .pause
        .as_ref()
        .and_then(|p| p.duration.as_deref())
        .and_then(parse_duration_ms);
    let started = status.and_then(|s| s.step_started_at.as_ref());
    if let (Some(duration_ms), Some(started)) = (duration_ms, started) {
        let elapsed_ms = now.as_millisecond() - started.0.as_millisecond();
        let left_ms = duration_ms - elapsed_ms;
        if left_ms > 0 {
            // Round up: "1s left" until the pause is really over.
            let _ = write!(line, " ({} left)", short_duration((left_ms + 999) / 1000));
        } else {
            line.push_str(" (elapsed)");
        }
    } else if step.pause.is_some() {
        line.push_str(" (kubectl shoal promote to continue)");
    } else if step.analysis.is_some() {
        line.push_str(" (waiting for a passing analysis)");
    }
    line
}

/// A progress bar of `done` out of `total`: `[#####.....]`. Rounds down, so the bar
/// is full only when everything is done.
pub fn progress_bar(done: i32, total: i32, width: usize) -> String {
    let filled = if total <= 0 {
        0
    } else {
        let done = done.clamp(0, total) as usize;
        done * width / total as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// One line per pool, names aligned:
/// `stores  [#####.....] 2/4 ready, 2 updated, 0 failed`.
pub fn pool_lines(pools: &[PoolProgress]) -> Vec<String> {
    let width = pools
        .iter()
        .map(|p| p.pool.chars().count())
        .max()
        .unwrap_or(0);
    pools
        .iter()
        .map(|p| {
            format!(
                "{:<width$}  {} {}/{} ready, {} updated, {} failed",
                p.pool,
                progress_bar(p.ready, p.agents, BAR_WIDTH),
                p.ready,
                p.agents,
                p.updated,
                p.failed
            )
        })
        .collect()
}

/// The pools' progress in spec order: the status entry of each pool in spec.pools
/// (zeros when the operator has not reported it yet), then any other pool the status
/// mentions.
pub fn pool_progress(rollout: &ModelRollout) -> Vec<PoolProgress> {
    let reported: &[PoolProgress] = rollout
        .status
        .as_ref()
        .map(|s| s.pools.as_slice())
        .unwrap_or_default();
    let mut pools: Vec<PoolProgress> = rollout
        .spec
        .pools
        .iter()
        .map(|name| {
            reported
                .iter()
                .find(|p| &p.pool == name)
                .cloned()
                .unwrap_or_else(|| PoolProgress {
                    pool: name.clone(),
                    ..PoolProgress::default()
                })
        })
        .collect();
    for extra in reported {
        if !rollout.spec.pools.contains(&extra.pool) {
            pools.push(extra.clone());
        }
    }
    pools
}

fn percent(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}

fn milliseconds(value: Option<f64>) -> String {
    value.map_or_else(|| NONE.to_owned(), |ms| format!("{ms:.1}"))
}

fn stable_version(rollout: &ModelRollout) -> String {
    rollout
        .status
        .as_ref()
        .and_then(|s| s.stable_version.clone())
        .unwrap_or_else(|| NONE.to_owned())
}

fn canary_version(rollout: &ModelRollout) -> String {
    rollout
        .status
        .as_ref()
        .and_then(|s| s.canary_version.clone())
        .unwrap_or_else(|| NONE.to_owned())
}

fn weight_text(rollout: &ModelRollout) -> String {
    match rollout.status.as_ref().and_then(|s| s.weight) {
        Some(weight) => format!("{weight}%"),
        None => NONE.to_owned(),
    }
}

fn age(rollout: &ModelRollout, now: Timestamp) -> String {
    match &rollout.metadata.creation_timestamp {
        Some(created) => human_age(seconds_since(&created.0, now)),
        None => NONE.to_owned(),
    }
}

/// The `get rollouts` table: NAME MODEL STABLE CANARY PHASE STEP WEIGHT AGE, with a
/// NAMESPACE column first when `with_namespace`.
pub fn rollouts_table(rollouts: &[ModelRollout], with_namespace: bool, now: Timestamp) -> String {
    let mut header = vec![
        "NAME", "MODEL", "STABLE", "CANARY", "PHASE", "STEP", "WEIGHT", "AGE",
    ];
    if with_namespace {
        header.insert(0, "NAMESPACE");
    }
    let rows: Vec<Vec<String>> = rollouts
        .iter()
        .map(|r| {
            let mut row = vec![
                r.name_any(),
                r.spec.model.clone(),
                stable_version(r),
                canary_version(r),
                phase_text(r),
                step_short(r),
                weight_text(r),
                age(r, now),
            ];
            if with_namespace {
                row.insert(0, r.namespace().unwrap_or_default());
            }
            row
        })
        .collect();
    table::render(&header, &rows)
}

/// The essentials of a rollout for `get -o json`.
pub fn rollout_summary(rollout: &ModelRollout) -> Value {
    let status = rollout.status.as_ref();
    json!({
        "name": rollout.name_any(),
        "namespace": rollout.namespace(),
        "model": rollout.spec.model,
        "version": rollout.spec.version,
        "phase": status.and_then(|s| s.phase),
        "step": status.and_then(|s| s.current_step),
        "steps": rollout.spec.steps.len(),
        "weight": status.and_then(|s| s.weight),
        "paused": rollout.spec.paused,
        "stableVersion": status.and_then(|s| s.stable_version.clone()),
        "canaryVersion": status.and_then(|s| s.canary_version.clone()),
        "pools": pool_progress(rollout),
    })
}

/// The human view of `kubectl shoal status`.
pub fn status_view(rollout: &ModelRollout, now: Timestamp) -> String {
    let status = rollout.status.clone().unwrap_or_default();
    let mut out = String::new();
    let name = rollout.name_any();
    let namespace = rollout.namespace().unwrap_or_default();
    let _ = writeln!(out, "Rollout:  {namespace}/{name}");
    let canary = status
        .canary_version
        .clone()
        .unwrap_or_else(|| rollout.spec.version.clone());
    let stable = status
        .stable_version
        .clone()
        .unwrap_or_else(|| "?".to_owned());
    let _ = writeln!(out, "Model:    {}  {stable} → {canary}", rollout.spec.model);
    let mut phase = phase_text(rollout);
    if rollout.spec.paused && !is_finished(rollout) {
        phase.push_str("  (spec.paused: kubectl shoal resume to continue)");
    }
    let _ = writeln!(out, "Phase:    {phase}");
    if let Some(message) = status.message.as_deref().filter(|m| !m.is_empty()) {
        let _ = writeln!(out, "Message:  {message}");
    }
    let _ = writeln!(out, "Step:     {}", step_line(rollout, now));
    let _ = writeln!(out, "Weight:   {}", weight_text(rollout));

    let pools = pool_progress(rollout);
    if !pools.is_empty() {
        let _ = writeln!(out, "\nPools (canary {canary} ready / agents):");
        for line in pool_lines(&pools) {
            let _ = writeln!(out, "  {line}");
        }
    }

    out.push('\n');
    match &status.last_analysis {
        None => out.push_str("Analysis: none yet\n"),
        Some(analysis) => {
            let when = analysis.time.as_ref().map_or_else(String::new, |t| {
                format!(" ({} ago)", human_age(seconds_since(&t.0, now)))
            });
            let _ = writeln!(out, "Analysis{when}:");
            let rows: Vec<Vec<String>> =
                [("canary", &analysis.canary), ("stable", &analysis.stable)]
                    .into_iter()
                    .map(|(cohort, figures)| {
                        vec![
                            cohort.to_owned(),
                            figures.requests.to_string(),
                            percent(figures.error_rate),
                            milliseconds(figures.p99_ms),
                        ]
                    })
                    .collect();
            let table = table::render(&["COHORT", "REQUESTS", "ERROR RATE", "P99 MS"], &rows);
            for line in table.lines() {
                let _ = writeln!(out, "  {line}");
            }
            let _ = write!(out, "  verdict: {}", analysis.verdict);
            if !analysis.message.is_empty() {
                let _ = write!(out, ": {}", analysis.message);
            }
            out.push('\n');
        }
    }

    if !status.history.is_empty() {
        let shown = status.history.len().min(HISTORY_SHOWN);
        let _ = writeln!(out, "\nHistory (last {shown} of {}):", status.history.len());
        let rows: Vec<Vec<String>> = status.history[status.history.len() - shown..]
            .iter()
            .map(|entry| {
                vec![
                    entry.version.clone(),
                    entry
                        .from_version
                        .clone()
                        .unwrap_or_else(|| NONE.to_owned()),
                    format!("{:?}", entry.phase),
                    entry.finished_at.as_ref().map_or_else(
                        || NONE.to_owned(),
                        |t| format!("{} ago", human_age(seconds_since(&t.0, now))),
                    ),
                    entry.message.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let table = table::render(&["VERSION", "FROM", "PHASE", "FINISHED", "MESSAGE"], &rows);
        for line in table.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use shoal_api::{
        AnalysisResult, CohortFigures, FinishedRollout, ModelRolloutSpec, ModelRolloutStatus,
        PauseStep,
    };

    const NOW: i64 = 1_800_000_000;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid time"))
    }

    fn now() -> Timestamp {
        Timestamp::from_second(NOW).expect("valid time")
    }

    fn weight(w: i32) -> RolloutStep {
        RolloutStep {
            set_weight: Some(w),
            ..RolloutStep::default()
        }
    }

    fn pause(duration: Option<&str>) -> RolloutStep {
        RolloutStep {
            pause: Some(PauseStep {
                duration: duration.map(str::to_owned),
            }),
            ..RolloutStep::default()
        }
    }

    pub(crate) fn rollout(phase: Option<RolloutPhase>, step: Option<i32>) -> ModelRollout {
        let mut r = ModelRollout::new(
            "detector-rollout",
            ModelRolloutSpec {
                model: "detector".into(),
                version: "1.1.0".into(),
                pools: vec!["stores".into(), "warehouses".into()],
                steps: vec![
                    weight(20),
                    pause(Some("30s")),
                    RolloutStep {
                        analysis: Some(Default::default()),
                        ..RolloutStep::default()
                    },
                    weight(50),
                    pause(None),
                ],
                analysis: None,
                max_unavailable: None,
                auto_rollback: true,
                paused: false,
            },
        );
        r.metadata.namespace = Some("shop".into());
        r.metadata.creation_timestamp = Some(at(NOW - 300));
        r.status = Some(ModelRolloutStatus {
            phase,
            current_step: step,
            step_started_at: Some(at(NOW - 18)),
            weight: Some(20),
            stable_version: Some("1.0.0".into()),
            canary_version: Some("1.1.0".into()),
            message: Some("pausing 30s".into()),
            pools: vec![PoolProgress {
                pool: "stores".into(),
                agents: 4,
                updated: 2,
                ready: 2,
                failed: 0,
            }],
            ..ModelRolloutStatus::default()
        });
        r
    }

    #[test]
    fn ages_like_kubectl() {
        assert_eq!(human_age(45), "45s");
        assert_eq!(human_age(119), "119s");
        assert_eq!(human_age(200), "3m20s");
        assert_eq!(human_age(300), "5m");
        assert_eq!(human_age(25 * 60), "25m");
        assert_eq!(human_age(5 * 3600 + 600), "5h10m");
        assert_eq!(human_age(30 * 3600), "30h");
        assert_eq!(human_age(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(human_age(40 * 86400), "40d");
        assert_eq!(human_age(-5), "0s");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_duration_ms("10"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(parse_duration_ms("5d"), None);
        assert_eq!(parse_duration_ms(""), None);
        assert_eq!(short_duration(12), "12s");
        assert_eq!(short_duration(90), "1m30s");
        assert_eq!(short_duration(7200), "2h");
        assert_eq!(short_duration(0), "0s");
    }

    #[test]
    fn progress_bars() {
        assert_eq!(progress_bar(2, 4, 10), "[#####.....]");
        assert_eq!(progress_bar(0, 4, 10), "[..........]");
        assert_eq!(progress_bar(4, 4, 10), "[##########]");
        assert_eq!(progress_bar(2, 3, 10), "[######....]");
        assert_eq!(progress_bar(0, 0, 10), "[..........]");
        assert_eq!(progress_bar(9, 4, 10), "[##########]");
        assert_eq!(progress_bar(-1, 4, 10), "[..........]");
    }

    #[test]
    fn pool_lines_align_names() {
        let pools = vec![
            PoolProgress {
                pool: "stores".into(),
                agents: 4,
                updated: 2,
                ready: 2,
                failed: 0,
            },
            PoolProgress {
                pool: "warehouses".into(),
                agents: 10,
                updated: 3,
                ready: 1,
                failed: 1,
            },
        ];
        assert_eq!(
            pool_lines(&pools),
            vec![
                "stores      [#####.....] 2/4 ready, 2 updated, 0 failed",
                "warehouses  [#.........] 1/10 ready, 3 updated, 1 failed",
            ]
        );
    }

    #[test]
    fn step_lines() {
        let r = rollout(Some(RolloutPhase::Paused), Some(1));
        assert_eq!(step_line(&r, now()), "2/5: pause 30s (12s left)");
        let r = rollout(Some(RolloutPhase::Progressing), Some(0));
        assert_eq!(step_line(&r, now()), "1/5: setWeight 20");
        let mut r = rollout(Some(RolloutPhase::Paused), Some(1));
        r.status.as_mut().expect("status").step_started_at = Some(at(NOW - 40));
        assert_eq!(step_line(&r, now()), "2/5: pause 30s (elapsed)");
        let r = rollout(Some(RolloutPhase::Paused), Some(4));
        assert_eq!(
            step_line(&r, now()),
            "5/5: pause (until promoted) (kubectl shoal promote to continue)"
        );
        let r = rollout(Some(RolloutPhase::Progressing), Some(2));
        assert_eq!(
            step_line(&r, now()),
            "3/5: analysis (waiting for a passing analysis)"
        );
        let r = rollout(Some(RolloutPhase::Progressing), Some(5));
        assert_eq!(
            step_line(&r, now()),
            "after step 5/5: moving the remaining agents"
        );
        let r = rollout(Some(RolloutPhase::Succeeded), Some(5));
        assert_eq!(step_line(&r, now()), "5/5: all steps done");
        let r = rollout(None, None);
        assert_eq!(step_line(&r, now()), "not started (5 steps)");
        let mut r = rollout(Some(RolloutPhase::Progressing), Some(0));
        r.spec.steps.clear();
        assert_eq!(
            step_line(&r, now()),
            "no steps: every agent moves to the new version at once"
        );
        assert_eq!(step_short(&r), "-");
    }

    #[test]
    fn remaining_pause_rounds_up() {
        let mut r = rollout(Some(RolloutPhase::Paused), Some(1));
        r.spec.steps[1] = pause(Some("1m30s"));
        r.status.as_mut().expect("status").step_started_at = Some(Time(
            Timestamp::from_millisecond(NOW * 1000 - 500).expect("valid"),
        ));
        assert_eq!(step_line(&r, now()), "2/5: pause 1m30s (1m30s left)");
    }

    #[test]
    fn get_table_layout() {
        let a = rollout(Some(RolloutPhase::Paused), Some(1));
        let mut b = rollout(None, None);
        b.metadata.name = Some("b".into());
        b.spec.model = "classifier-large".into();
        b.status = None;
        let text = rollouts_table(&[a.clone(), b.clone()], false, now());
        assert_eq!(
            text,
            "NAME               MODEL              STABLE   CANARY   PHASE    STEP   WEIGHT   AGE\n\
             detector-rollout   detector           1.0.0    1.1.0    Paused   2/5    20%      5m\n\
             b                  classifier-large   -        -        -        -      -        5m\n"
        );
        let text = rollouts_table(&[a], true, now());
        assert!(text.starts_with("NAMESPACE   NAME "), "{text}");
        assert!(text.contains("\nshop        detector-rollout "), "{text}");
    }

    #[test]
    fn summary_json_lists_every_spec_pool() {
        let r = rollout(Some(RolloutPhase::Paused), Some(1));
        let json = rollout_summary(&r);
        assert_eq!(json["name"], "detector-rollout");
        assert_eq!(json["namespace"], "shop");
        assert_eq!(json["phase"], "Paused");
        assert_eq!(json["step"], 1);
        assert_eq!(json["stableVersion"], "1.0.0");
        assert_eq!(json["pools"][0]["ready"], 2);
        assert_eq!(json["pools"][1]["pool"], "warehouses");
        assert_eq!(json["pools"][1]["agents"], 0);
    }

    #[test]
    fn status_view_sections() {
        let mut r = rollout(Some(RolloutPhase::Degraded), Some(2));
        let status = r.status.as_mut().expect("status");
        status.message = Some("analysis failed".into());
        status.last_analysis = Some(AnalysisResult {
            time: Some(at(NOW - 12)),
            canary: CohortFigures {
                requests: 120,
                error_rate: 0.05,
                p99_ms: Some(45.0),
            },
            stable: CohortFigures {
                requests: 1200,
                error_rate: 0.001,
                p99_ms: None,
            },
            verdict: "Fail".into(),
            message: "canary error rate 5.00% is above 1.00%".into(),
        });
        status.history = (0..7)
            .map(|i| FinishedRollout {
                version: format!("0.{i}.0"),
                phase: RolloutPhase::Succeeded,
                from_version: Some(format!("0.{}.0", i - 1)),
                message: Some("done".into()),
                finished_at: Some(at(NOW - 3600)),
            })
            .collect();
        let text = status_view(&r, now());
        let expected = "\
Rollout:  shop/detector-rollout
Model:    detector  1.0.0 → 1.1.0
Phase:    Degraded
Message:  analysis failed
Step:     3/5: analysis (waiting for a passing analysis)
Weight:   20%

Pools (canary 1.1.0 ready / agents):
  stores      [#####.....] 2/4 ready, 2 updated, 0 failed
  warehouses  [..........] 0/0 ready, 0 updated, 0 failed

Analysis (12s ago):
  COHORT   REQUESTS   ERROR RATE   P99 MS
  canary   120        5.00%        45.0
  stable   1200       0.10%        -
  verdict: Fail: canary error rate 5.00% is above 1.00%

History (last 5 of 7):
  VERSION   FROM    PHASE       FINISHED   MESSAGE
  0.2.0     0.1.0   Succeeded   60m ago    done
  0.3.0     0.2.0   Succeeded   60m ago    done
  0.4.0     0.3.0   Succeeded   60m ago    done
  0.5.0     0.4.0   Succeeded   60m ago    done
  0.6.0     0.5.0   Succeeded   60m ago    done
";
        assert_eq!(text, expected);
    }

    #[test]
    fn status_view_paused_and_empty() {
        let mut r = rollout(None, None);
        r.status = None;
        r.spec.paused = true;
        let text = status_view(&r, now());
        assert!(text.contains("Model:    detector  ? → 1.1.0\n"), "{text}");
        assert!(
            text.contains("Phase:    -  (spec.paused: kubectl shoal resume to continue)\n"),
            "{text}"
        );
        assert!(text.contains("Analysis: none yet\n"), "{text}");
        assert!(!text.contains("History"), "{text}");
    }
}
