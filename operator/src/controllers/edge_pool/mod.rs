//! The EdgePool controller: builds the agent DaemonSet, its ServiceAccount, Service
//! and CA ConfigMap (`daemonset`), applies them when they change, and summarises the
//! pool's agents into status. `policy` says what a pool may ask the operator to run
//! and where; `plan` decides; `controller` carries out.

pub mod controller;
pub mod daemonset;
pub mod plan;
pub mod policy;

pub use controller::{CONTROLLER, run};
