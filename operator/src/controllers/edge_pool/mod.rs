//! The EdgePool controller: builds the agent DaemonSet, its ServiceAccount, Service
//! and CA ConfigMap (`daemonset`), applies them when they change, and summarises the
//! pool's agents into status. `plan` decides; `controller` carries out.

pub mod controller;
pub mod daemonset;
pub mod plan;

pub use controller::{CONTROLLER, run};
