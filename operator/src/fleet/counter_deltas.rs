//! Turns an agent's cumulative counters into increments for the fleet totals. Agents
//! count from their own start, so a lost report loses nothing; a restarted agent
//! (new `agentStartTime`, or a counter that went down) counts again from zero.

use k8s_openapi::jiff::Timestamp;
use shoal_api::agent_protocol::AgentReport;

/// Requests and errors one model version served between two reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDelta {
    pub model: String,
    pub version: String,
    pub requests: u64,
    pub errors: u64,
}

/// The increments `current` adds over `previous`, the same agent's last report.
///
/// Without a previous report the operator cannot know how much of the counters it
/// already counted before it restarted itself. So it counts them in full only when
/// the agent started after the operator did (all of it is new); otherwise the
/// report is the baseline and adds nothing. Versions with nothing new are left out.
pub fn counter_deltas(
    previous: Option<&AgentReport>,
    current: &AgentReport,
    operator_started: Timestamp,
) -> Vec<ModelDelta> {
    let restarted = match previous {
        // The same instant may be written in other time zones: compare instants, or
        // an agent alternating two spellings would count everything again each time.
        Some(previous) => {
            let started = |report: &AgentReport| report.agent_start_time.parse::<Timestamp>().ok();
            match (started(previous), started(current)) {
                (Some(before), Some(now)) => before != now,
                _ => previous.agent_start_time != current.agent_start_time,
            }
        }
        None => {
            let agent_started = current.agent_start_time.parse::<Timestamp>().ok();
            if agent_started.is_none_or(|started| started < operator_started) {
                return Vec::new();
            }
            true
        }
    };
    let mut deltas = Vec::new();
    for model in &current.models {
        let before = previous.filter(|_| !restarted).and_then(|previous| {
            previous
                .models
                .iter()
                .find(|m| m.name == model.name && m.version == model.version)
        });
        let (requests, errors) = match before {
            Some(before) if model.requests >= before.requests && model.errors >= before.errors => (
                model.requests - before.requests,
                model.errors - before.errors,
            ),
            // New since the last report, or its counters were reset: all of it is new.
            _ => (model.requests, model.errors),
        };
        if requests > 0 || errors > 0 {
            deltas.push(ModelDelta {
                model: model.name.clone(),
                version: model.version.clone(),
                requests,
                errors,
            });
        }
    }
    deltas
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::agent_protocol::ModelReport;

    const OPERATOR_STARTED: &str = "2025-06-01T12:00:00Z";
    const BEFORE: &str = "2025-06-01T11:00:00Z";
    const AFTER: &str = "2025-06-01T12:30:00Z";

    fn report(started: &str, models: &[(&str, &str, u64, u64)]) -> AgentReport {
        AgentReport {
            node: "n1".into(),
            agent_start_time: started.into(),
            models: models
                .iter()
                .map(|(name, version, requests, errors)| ModelReport {
                    name: name.to_string(),
                    version: version.to_string(),
                    requests: *requests,
                    errors: *errors,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn delta(model: &str, version: &str, requests: u64, errors: u64) -> ModelDelta {
        ModelDelta {
            model: model.into(),
            version: version.into(),
            requests,
            errors,
        }
    }

    #[test]
    fn delta_table() {
        let cases: Vec<(&str, Option<AgentReport>, AgentReport, Vec<ModelDelta>)> = vec![
            (
                "counters grow: the difference",
                Some(report(BEFORE, &[("m", "1", 10, 1)])),
                report(BEFORE, &[("m", "1", 25, 3)]),
                vec![delta("m", "1", 15, 2)],
            ),
            (
                "nothing new: nothing",
                Some(report(BEFORE, &[("m", "1", 10, 1)])),
                report(BEFORE, &[("m", "1", 10, 1)]),
                vec![],
            ),
            (
                "a counter went down: the agent restarted, count from zero",
                Some(report(BEFORE, &[("m", "1", 10, 1)])),
                report(BEFORE, &[("m", "1", 4, 0)]),
                vec![delta("m", "1", 4, 0)],
            ),
            (
                "new agentStartTime: count from zero even if counters grew",
                Some(report(BEFORE, &[("m", "1", 10, 1)])),
                report(AFTER, &[("m", "1", 30, 2)]),
                vec![delta("m", "1", 30, 2)],
            ),
            (
                "the same start time in another time zone is no restart",
                Some(report(BEFORE, &[("m", "1", 10, 1)])),
                report("2025-06-01T13:00:00+02:00", &[("m", "1", 25, 3)]),
                vec![delta("m", "1", 15, 2)],
            ),
            (
                "a version new since the last report counts in full",
                Some(report(BEFORE, &[("m", "1", 10, 0)])),
                report(BEFORE, &[("m", "1", 12, 0), ("m", "2", 5, 1)]),
                vec![delta("m", "1", 2, 0), delta("m", "2", 5, 1)],
            ),
            (
                "first report of an agent that started after the operator: in full",
                None,
                report(AFTER, &[("m", "1", 7, 1)]),
                vec![delta("m", "1", 7, 1)],
            ),
            (
                "first report of an agent older than the operator: baseline only",
                None,
                report(BEFORE, &[("m", "1", 7, 1)]),
                vec![],
            ),
            (
                "first report with an unreadable start time: baseline only",
                None,
                report("yesterday", &[("m", "1", 7, 1)]),
                vec![],
            ),
        ];
        let operator_started: Timestamp = OPERATOR_STARTED.parse().expect("timestamp");
        for (what, previous, current, want) in cases {
            assert_eq!(
                counter_deltas(previous.as_ref(), &current, operator_started),
                want,
                "{what}"
            );
        }
    }
}
