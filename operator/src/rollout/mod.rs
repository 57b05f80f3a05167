//! Progressive rollouts: the ModelRollout controller (`controller`, the I/O shell)
//! and the pure decisions it carries out — the step machine (`steps`), canary
//! cohorts (`cohort`) and the analysis verdict (`analysis`).

pub mod analysis;
pub mod cohort;
pub mod controller;
pub mod steps;
