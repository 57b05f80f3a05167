//! Which fleet series (`shoal_fleet_requests_total` and `shoal_fleet_errors_total`,
//! one per namespace, model, version and pool) to drop: those whose model version
//! no rollout plan, no agent's recent assignment and no agent's latest report has
//! named for [`UNNAMED_FOR`]. So the cap on series ([`MAX_FLEET_SERIES`]) holds the
//! versions in use, never the history of every version ever served.
//!
//! [`MAX_FLEET_SERIES`]: crate::runtime::metrics::MAX_FLEET_SERIES

use crate::fleet::recent_assignments::NamespacedVersion;
use crate::runtime::metrics::FleetLabels;
use k8s_openapi::jiff::Timestamp;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// How long a series stays after nothing names its version any more: long enough
/// for Prometheus to scrape its last increments many times over.
pub const UNNAMED_FOR: Duration = Duration::from_secs(15 * 60);

/// Since when each series' version has been named by nothing.
#[derive(Debug, Default)]
pub struct UnnamedSeries {
    since: HashMap<FleetLabels, Timestamp>,
}

impl UnnamedSeries {
    pub fn new() -> Self {
        Self::default()
    }

    /// One pass over every current `series`, given the versions something names
    /// now: returns the series unnamed for longer than [`UNNAMED_FOR`], which the
    /// caller removes, and forgets them.
    pub fn expired(
        &mut self,
        series: Vec<FleetLabels>,
        named: &HashSet<NamespacedVersion>,
        now: Timestamp,
    ) -> Vec<FleetLabels> {
        let mut gone = Vec::new();
        let mut since = HashMap::new();
        for labels in series {
            let version = (
                labels.namespace.clone(),
                labels.model.clone(),
                labels.version.clone(),
            );
            if named.contains(&version) {
                continue;
            }
            let unnamed_since = self.since.get(&labels).copied().unwrap_or(now);
            let unnamed_for =
                Duration::try_from(now.duration_since(unnamed_since)).unwrap_or_default();
            if unnamed_for > UNNAMED_FOR {
                gone.push(labels);
            } else {
                since.insert(labels, unnamed_since);
            }
        }
        // Series named again, or gone, are forgotten.
        self.since = since;
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(version: &str) -> FleetLabels {
        FleetLabels {
            namespace: "shop".into(),
            model: "ranker".into(),
            version: version.into(),
            pool: "stores".into(),
        }
    }

    fn named(versions: &[&str]) -> HashSet<NamespacedVersion> {
        versions
            .iter()
            .map(|version| ("shop".into(), "ranker".into(), version.to_string()))
            .collect()
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_750_000_000 + seconds).expect("a valid time")
    }

    const WAIT: i64 = UNNAMED_FOR.as_secs() as i64;

    #[test]
    fn a_series_goes_once_nothing_named_its_version_for_a_while() {
        let mut unnamed = UnnamedSeries::new();
        let all = || vec![labels("1.0"), labels("2.0")];
        // 2.0 is the version in use; nothing names 1.0 any more from t=0 on.
        assert!(unnamed.expired(all(), &named(&["2.0"]), at(0)).is_empty());
        assert!(
            unnamed
                .expired(all(), &named(&["2.0"]), at(WAIT))
                .is_empty()
        );
        assert_eq!(
            unnamed.expired(all(), &named(&["2.0"]), at(WAIT + 1)),
            [labels("1.0")]
        );
        assert!(
            unnamed
                .expired(vec![labels("2.0")], &named(&["2.0"]), at(10 * WAIT))
                .is_empty(),
            "a named version's series stays however old it is"
        );
    }

    #[test]
    fn named_again_starts_the_wait_over() {
        let mut unnamed = UnnamedSeries::new();
        let one = || vec![labels("1.0")];
        assert!(unnamed.expired(one(), &named(&[]), at(0)).is_empty());
        // Rolled back to 1.0 before the wait ran out.
        assert!(
            unnamed
                .expired(one(), &named(&["1.0"]), at(WAIT / 2))
                .is_empty()
        );
        assert!(unnamed.expired(one(), &named(&[]), at(WAIT)).is_empty());
        assert!(
            unnamed
                .expired(one(), &named(&[]), at(WAIT + WAIT / 2))
                .is_empty()
        );
        assert_eq!(
            unnamed.expired(one(), &named(&[]), at(2 * WAIT + 1)),
            [labels("1.0")]
        );
    }

    #[test]
    fn the_same_version_in_another_namespace_does_not_keep_a_series() {
        let mut unnamed = UnnamedSeries::new();
        let elsewhere: HashSet<NamespacedVersion> =
            HashSet::from([("other".into(), "ranker".into(), "1.0".into())]);
        unnamed.expired(vec![labels("1.0")], &elsewhere, at(0));
        assert_eq!(
            unnamed.expired(vec![labels("1.0")], &elsewhere, at(WAIT + 1)),
            [labels("1.0")]
        );
    }

    #[test]
    fn removed_series_are_forgotten() {
        let mut unnamed = UnnamedSeries::new();
        unnamed.expired(vec![labels("1.0")], &named(&[]), at(0));
        assert_eq!(
            unnamed.expired(vec![labels("1.0")], &named(&[]), at(WAIT + 1)),
            [labels("1.0")]
        );
        assert!(unnamed.since.is_empty());
        // Counted again later (a new report), it waits from scratch.
        assert!(
            unnamed
                .expired(vec![labels("1.0")], &named(&[]), at(WAIT + 2))
                .is_empty()
        );
    }
}
