//! The ModelRollout controller: observes the canary and stable cohorts in the
//! in-memory fleet state (`observe`), judges each analysis window (`analysis`),
//! and moves through the steps (`steps`, the step machine). `controller` carries
//! the decisions out and writes status.

pub mod analysis;
pub mod controller;
pub mod observe;
pub mod steps;

pub use controller::{CONTROLLER, run};
