//! Helpers for the standard `metav1.Condition` lists in Shoal's statuses: build a
//! condition, and set it in a list keyed by type the way `meta.SetStatusCondition`
//! does in Go (lastTransitionTime moves only when the status changes). Pure functions:
//! the caller passes the current time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The status of a condition: True, False or Unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell.
    Unknown,
}

impl ConditionStatus {
    /// The wire form: "True", "False" or "Unknown".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(holds: bool) -> Self {
        if holds { Self::True } else { Self::False }
    }
}

/// A condition of `type_` with `status`, a CamelCase `reason` and a human `message`,
/// for the object generation it was computed from, that changed at `now`.
pub fn new_condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Puts `condition` in `conditions`, replacing the one of the same type or appending
/// it. When the status is the same as before, the earlier lastTransitionTime is kept:
/// it says since when the status has held, not when it was last checked. Returns
/// whether anything changed, so a caller can skip a status write that changes nothing.
pub fn set_condition(conditions: &mut Vec<Condition>, condition: Condition) -> bool {
    let Some(existing) = conditions.iter_mut().find(|c| c.type_ == condition.type_) else {
        conditions.push(condition);
        return true;
    };
    let last_transition_time = if existing.status == condition.status {
        existing.last_transition_time.clone()
    } else {
        condition.last_transition_time.clone()
    };
    let updated = Condition {
        last_transition_time,
        ..condition
    };
    if *existing == updated {
        return false;
    }
    *existing = updated;
    true
}

/// The condition of `type_`, if there is one.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present and True.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True.as_str())
}

/// Removes the condition of `type_`; returns whether there was one.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    fn ready(status: ConditionStatus, reason: &str, generation: i64, now: i64) -> Condition {
        new_condition(
            "Ready",
            status,
            reason,
            format!("{reason} message"),
            Some(generation),
            at(now),
        )
    }

    #[test]
    fn new_condition_fills_every_field() {
        let c = new_condition(
            "Ready",
            ConditionStatus::False,
            "Fetching",
            "downloading",
            Some(3),
            at(100),
        );
        assert_eq!(c.type_, "Ready");
        assert_eq!(c.status, "False");
        assert_eq!(c.reason, "Fetching");
        assert_eq!(c.message, "downloading");
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(c.last_transition_time, at(100));
    }

    #[test]
    fn status_from_bool_and_wire_form() {
        assert_eq!(ConditionStatus::from(true).as_str(), "True");
        assert_eq!(ConditionStatus::from(false).as_str(), "False");
        assert_eq!(ConditionStatus::Unknown.as_str(), "Unknown");
    }

    #[test]
    fn set_appends_a_new_type() {
        let mut conditions = vec![];
        assert!(set_condition(
            &mut conditions,
            ready(ConditionStatus::True, "Serving", 1, 10)
        ));
        let degraded = new_condition(
            "Degraded",
            ConditionStatus::False,
            "Healthy",
            "",
            Some(1),
            at(10),
        );
        assert!(set_condition(&mut conditions, degraded));
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Degraded"]);
    }

    #[test]
    fn same_status_keeps_transition_time_but_takes_the_rest() {
        let mut conditions = vec![ready(ConditionStatus::False, "Fetching", 1, 10)];
        assert!(set_condition(
            &mut conditions,
            ready(ConditionStatus::False, "Compressing", 2, 50)
        ));
        assert_eq!(conditions.len(), 1);
        let c = &conditions[0];
        assert_eq!(c.last_transition_time, at(10));
        assert_eq!(c.reason, "Compressing");
        assert_eq!(c.message, "Compressing message");
        assert_eq!(c.observed_generation, Some(2));
    }

    #[test]
    fn status_change_moves_transition_time() {
        let mut conditions = vec![ready(ConditionStatus::False, "Fetching", 1, 10)];
        assert!(set_condition(
            &mut conditions,
            ready(ConditionStatus::True, "Serving", 1, 60)
        ));
        assert_eq!(conditions[0].status, "True");
        assert_eq!(conditions[0].last_transition_time, at(60));
    }

    #[test]
    fn setting_the_same_condition_later_changes_nothing() {
        let mut conditions = vec![ready(ConditionStatus::True, "Serving", 1, 10)];
        let before = conditions.clone();
        assert!(!set_condition(
            &mut conditions,
            ready(ConditionStatus::True, "Serving", 1, 99)
        ));
        assert_eq!(conditions, before);
    }

    #[test]
    fn set_leaves_other_types_alone() {
        let other = new_condition(
            "Progressing",
            ConditionStatus::True,
            "Fetching",
            "",
            Some(1),
            at(5),
        );
        let mut conditions = vec![
            other.clone(),
            ready(ConditionStatus::False, "Fetching", 1, 5),
        ];
        set_condition(
            &mut conditions,
            ready(ConditionStatus::True, "Serving", 1, 20),
        );
        assert_eq!(conditions[0], other);
        assert_eq!(conditions[1].status, "True");
    }

    #[test]
    fn find_is_true_and_remove() {
        let mut conditions = vec![ready(ConditionStatus::True, "Serving", 1, 10)];
        assert!(is_condition_true(&conditions, "Ready"));
        assert!(!is_condition_true(&conditions, "Degraded"));
        assert_eq!(
            find_condition(&conditions, "Ready").map(|c| c.reason.as_str()),
            Some("Serving")
        );
        assert!(remove_condition(&mut conditions, "Ready"));
        assert!(!remove_condition(&mut conditions, "Ready"));
        assert!(conditions.is_empty());
        assert!(!is_condition_true(&conditions, "Ready"));
    }

    #[test]
    fn unknown_is_not_true() {
        let conditions = vec![ready(ConditionStatus::Unknown, "Waiting", 1, 10)];
        assert!(!is_condition_true(&conditions, "Ready"));
    }
}
