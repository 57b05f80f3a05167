//! Who serves what, as pure functions: the canary order of a rollout's nodes and
//! cohort sizes (`cohort`), and the assignment each node polls for (`assignment`).
//! Used by the rollout controller, the fleet view and the agent API alike.

pub mod assignment;
pub mod cohort;
