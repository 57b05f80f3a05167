//! The analysis verdict: the canary cohort's requests, error rate and p99 latency
//! over a window, against the rollout's thresholds and the stable cohort. Pure.

use super::steps;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use shoal_api::agent_protocol::ModelReport;
use shoal_api::{AnalysisResult, AnalysisSpec, CohortFigures};
use std::collections::HashMap;
use std::time::Duration;

/// The most requests one agent is taken to serve per second of an analysis window.
/// A node's window counts beyond it are scaled down to it, so one node that
/// reports implausible numbers cannot outweigh the rest of its cohort.
pub const MAX_REQUESTS_PER_AGENT_SECOND: u64 = 20_000;

/// One agent's cumulative counters for one model version, as reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub requests: u64,
    pub errors: u64,
    /// Cumulative histogram: (upper bound in ms, requests at or below it).
    pub buckets: Vec<(f64, u64)>,
}

impl Counters {
    pub fn from_report(report: &ModelReport) -> Counters {
        Counters {
            requests: report.requests,
            errors: report.errors,
            buckets: report
                .latency_buckets
                .iter()
                .map(|b| (b.le_ms, b.count))
                .collect(),
        }
    }

    /// What happened since `baseline`. Counters that went down mean the agent
    /// restarted: everything it reports is then new.
    pub fn since(&self, baseline: Option<&Counters>) -> Counters {
        let Some(base) =
            baseline.filter(|b| b.requests <= self.requests && b.errors <= self.errors)
        else {
            return self.clone();
        };
        Counters {
            requests: self.requests - base.requests,
            errors: self.errors - base.errors,
            buckets: self
                .buckets
                .iter()
                .map(|(le, count)| {
                    let before = base
                        .buckets
                        .iter()
                        .find(|(b_le, _)| b_le == le)
                        .map_or(0, |(_, c)| *c);
                    (*le, count.saturating_sub(before))
                })
                .collect(),
        }
    }
}

impl Counters {
    /// These counters with at most `max_requests` requests: errors and latency
    /// counts are scaled by the same factor (so the node keeps its error rate and
    /// latency shape), and no count exceeds the requests.
    pub fn bounded(self, max_requests: u64) -> Counters {
        let requests = self.requests.min(max_requests);
        let scale = |count: u64| -> u64 {
            let count = count.min(self.requests);
            if self.requests <= max_requests {
                return count;
            }
            // u128: count * max_requests cannot overflow.
            (u128::from(count) * u128::from(max_requests) / u128::from(self.requests)) as u64
        };
        Counters {
            requests,
            errors: scale(self.errors),
            buckets: self
                .buckets
                .iter()
                .map(|(le, count)| (*le, scale(*count)))
                .collect(),
        }
    }
}

/// The figures of a cohort from its agents' window counters.
pub fn cohort<'a>(agents: impl IntoIterator<Item = &'a Counters>) -> CohortFigures {
    let mut requests = 0u64;
    let mut errors = 0u64;
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for counters in agents {
        requests = requests.saturating_add(counters.requests);
        errors = errors.saturating_add(counters.errors);
        for (le, count) in &counters.buckets {
            match buckets.iter_mut().find(|(b_le, _)| b_le == le) {
                Some((_, total)) => *total = total.saturating_add(*count),
                None => buckets.push((*le, *count)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    CohortFigures {
        requests,
        error_rate: if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        },
        p99_ms: p99(&buckets, requests),
    }
}

/// The upper bound of the bucket holding the 99th percentile request (the largest
/// bound when it lies beyond every bucket, as Prometheus' histogram_quantile does).
pub fn p99(buckets: &[(f64, u64)], requests: u64) -> Option<f64> {
    if requests == 0 {
        return None;
    }
    let rank = requests.saturating_mul(99).div_ceil(100);
    buckets
        .iter()
        .find(|(_, count)| *count >= rank)
        .or(buckets.last())
        .map(|(le, _)| *le)
}

/// Pass, Fail or Inconclusive, with the reason in words.
pub fn verdict(
    spec: &AnalysisSpec,
    canary: &CohortFigures,
    stable: &CohortFigures,
) -> (&'static str, String) {
    let min_requests = spec.min_requests_or_default();
    if canary.requests < min_requests {
        return (
            AnalysisResult::INCONCLUSIVE,
            format!(
                "the canary served {} requests, fewer than minRequests {min_requests}",
                canary.requests
            ),
        );
    }
    let mut failures = Vec::new();
    if let Some(max) = spec.max_error_rate
        && canary.error_rate > max
    {
        failures.push(format!(
            "error rate {:.2}% > maxErrorRate {:.2}%",
            canary.error_rate * 100.0,
            max * 100.0
        ));
    }
    if let (Some(max), Some(p99)) = (spec.max_p99_latency_ms, canary.p99_ms)
        && p99 > max
    {
        failures.push(format!("p99 {p99} ms > maxP99LatencyMs {max}"));
    }
    if let (Some(max), Some(canary_p99), Some(stable_p99)) =
        (spec.max_p99_regression, canary.p99_ms, stable.p99_ms)
        && stable_p99 > 0.0
        && canary_p99 / stable_p99 > max
    {
        failures.push(format!(
            "p99 {canary_p99} ms is {:.2}x the stable cohort's {stable_p99} ms > maxP99Regression {max}",
            canary_p99 / stable_p99
        ));
    }
    if failures.is_empty() {
        (
            AnalysisResult::PASS,
            format!(
                "the canary holds every threshold over {} requests",
                canary.requests
            ),
        )
    } else {
        (AnalysisResult::FAIL, failures.join("; "))
    }
}

/// Counters at the start of an analysis window, per node, for both cohorts. A window
/// covers one canary version at one weight: when the weight changes, the next verdict
/// is about the new cohort only.
pub struct AnalysisWindow {
    canary_version: String,
    weight: i32,
    started: Timestamp,
    next_check: Timestamp,
    canary: HashMap<String, Counters>,
    stable: HashMap<String, Counters>,
}

/// The verdict of the rollout's analysis window if it is due, else None. A
/// conclusive verdict starts a new window; an inconclusive one lets the window grow
/// and looks again an interval later.
pub fn close_window(
    windows: &mut HashMap<String, AnalysisWindow>,
    key: &str,
    spec: &AnalysisSpec,
    (canary_version, weight): (&str, i32),
    now: Timestamp,
    canary_now: HashMap<String, Counters>,
    stable_now: HashMap<String, Counters>,
) -> Option<AnalysisResult> {
    let interval =
        steps::parse_duration(spec.interval_or_default()).unwrap_or(Duration::from_secs(30));
    let after = |t: Timestamp| t.checked_add(interval).unwrap_or(t);
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
    let seconds = Duration::try_from(now.duration_since(window.started))
        .unwrap_or_default()
        .as_secs();
    let per_agent = MAX_REQUESTS_PER_AGENT_SECOND.saturating_mul(seconds.max(1));
    let canary_delta: Vec<Counters> = canary_now
        .iter()
        .map(|(node, c)| c.since(window.canary.get(node)).bounded(per_agent))
        .collect();
    let stable_delta: Vec<Counters> = stable_now
        .iter()
        .map(|(node, c)| c.since(window.stable.get(node)).bounded(per_agent))
        .collect();
    let canary = cohort(&canary_delta);
    let stable = cohort(&stable_delta);
    let (verdict, message) = verdict(spec, &canary, &stable);
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

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 5] = [1.0, 5.0, 10.0, 50.0, 100.0];

    /// `per_bucket[i]` requests fall in bucket i (non-cumulative), `beyond` past the last.
    fn counters(per_bucket: [u64; 5], beyond: u64, errors: u64) -> Counters {
        let mut running = 0;
        let buckets = BOUNDS
            .iter()
            .zip(per_bucket)
            .map(|(le, n)| {
                running += n;
                (*le, running)
            })
            .collect();
        Counters {
            requests: running + beyond,
            errors,
            buckets,
        }
    }

    fn spec() -> AnalysisSpec {
        AnalysisSpec {
            min_requests: Some(100),
            max_error_rate: Some(0.01),
            max_p99_latency_ms: Some(50.0),
            max_p99_regression: Some(2.0),
            ..Default::default()
        }
    }

    fn figures(requests: u64, error_rate: f64, p99: Option<f64>) -> CohortFigures {
        CohortFigures {
            requests,
            error_rate,
            p99_ms: p99,
        }
    }

    #[test]
    fn window_counters_subtract_the_baseline_and_survive_restarts() {
        let before = counters([10, 0, 0, 0, 0], 0, 1);
        let after = counters([30, 5, 0, 0, 0], 0, 2);
        let delta = after.since(Some(&before));
        assert_eq!(delta.requests, 25);
        assert_eq!(delta.errors, 1);
        assert_eq!(delta.buckets[0], (1.0, 20));
        assert_eq!(delta.buckets[1], (5.0, 25));
        // The agent restarted: its counters went down, all of them are new.
        let restarted = counters([3, 0, 0, 0, 0], 0, 0);
        assert_eq!(restarted.since(Some(&after)), restarted);
        assert_eq!(after.since(None), after);
    }

    #[test]
    fn cohort_sums_agents_and_reads_p99_from_buckets() {
        let a = counters([90, 9, 0, 1, 0], 0, 1);
        let b = counters([100, 0, 0, 0, 0], 0, 0);
        let figures = cohort([&a, &b]);
        assert_eq!(figures.requests, 200);
        assert_eq!(figures.error_rate, 0.005);
        // rank 198 of 200: 190 at <=1, 199 at <=5.
        assert_eq!(figures.p99_ms, Some(5.0));
        assert_eq!(cohort([]).p99_ms, None);
        // Past the last bucket: the largest bound.
        let slow = counters([0, 0, 0, 0, 0], 10, 0);
        assert_eq!(cohort([&slow]).p99_ms, Some(100.0));
    }

    #[test]
    fn p99_edges() {
        let buckets = [(1.0, 99), (5.0, 100)];
        assert_eq!(p99(&buckets, 100), Some(1.0), "99 of 100 at or below 1 ms");
        let buckets = [(1.0, 98), (5.0, 100)];
        assert_eq!(p99(&buckets, 100), Some(5.0));
        assert_eq!(p99(&buckets, 0), None);
    }

    #[test]
    fn verdict_table() {
        // (canary, stable p99, verdict, text the message must hold)
        let cases: [(CohortFigures, f64, &str, &str); 9] = [
            (
                figures(99, 0.5, Some(500.0)),
                10.0,
                "Inconclusive",
                "fewer than minRequests 100",
            ),
            (
                figures(100, 0.0, Some(10.0)),
                10.0,
                "Pass",
                "holds every threshold",
            ),
            (
                figures(100, 0.01, Some(10.0)),
                10.0,
                "Pass",
                "at maxErrorRate exactly",
            ),
            (
                figures(100, 0.0101, Some(10.0)),
                10.0,
                "Fail",
                "error rate 1.01% > maxErrorRate 1.00%",
            ),
            (
                figures(100, 0.0, Some(50.0)),
                40.0,
                "Pass",
                "at maxP99LatencyMs exactly",
            ),
            (
                figures(100, 0.0, Some(50.5)),
                40.0,
                "Fail",
                "p99 50.5 ms > maxP99LatencyMs 50",
            ),
            (figures(100, 0.0, Some(20.0)), 10.0, "Pass", "2x is allowed"),
            (
                figures(100, 0.0, Some(25.0)),
                10.0,
                "Fail",
                "2.50x the stable cohort's 10 ms",
            ),
            (
                figures(100, 0.5, Some(500.0)),
                10.0,
                "Fail",
                "error rate 50.00%",
            ),
        ];
        for (canary, stable_p99, expected, text) in cases {
            let stable = figures(1000, 0.0, Some(stable_p99));
            let (result, message) = verdict(&spec(), &canary, &stable);
            assert_eq!(result, expected, "{canary:?}: {message}");
            if expected != "Pass" || text.contains("holds") {
                assert!(message.contains(text), "{message} should contain {text}");
            }
        }
    }

    #[test]
    fn unset_thresholds_and_missing_stable_figures_do_not_fail() {
        let spec = AnalysisSpec {
            min_requests: Some(1),
            ..Default::default()
        };
        let (result, _) = verdict(
            &spec,
            &figures(5, 1.0, Some(9999.0)),
            &figures(0, 0.0, None),
        );
        assert_eq!(result, "Pass");
        let regression_only = AnalysisSpec {
            min_requests: Some(1),
            max_p99_regression: Some(1.5),
            ..Default::default()
        };
        let (result, _) = verdict(
            &regression_only,
            &figures(5, 0.0, Some(100.0)),
            &figures(0, 0.0, None),
        );
        assert_eq!(
            result, "Pass",
            "no stable traffic: nothing to regress against"
        );
    }

    #[test]
    fn implausible_counts_are_scaled_down_and_sums_never_wrap() {
        let huge = Counters {
            requests: 4_000,
            errors: 9_000, // more errors than requests: at most the requests count
            buckets: vec![(5.0, 2_000), (10.0, 4_000)],
        };
        let bounded = huge.clone().bounded(1_000);
        assert_eq!((bounded.requests, bounded.errors), (1_000, 1_000));
        assert_eq!(bounded.buckets, vec![(5.0, 500), (10.0, 1_000)]);
        assert_eq!(
            huge.clone().bounded(10_000).errors,
            4_000,
            "within the bound: kept, errors capped"
        );

        let max = Counters {
            requests: u64::MAX,
            errors: u64::MAX / 2,
            buckets: vec![(10.0, u64::MAX)],
        };
        let figures = cohort([&max, &max]);
        assert_eq!(figures.requests, u64::MAX);
        assert_eq!(figures.p99_ms, Some(10.0));
    }
}
