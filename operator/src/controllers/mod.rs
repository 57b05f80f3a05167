//! One folder per custom resource, each with the same rooms: `controller.rs` (the
//! thin I/O shell: read, carry out the plan, write status), the pure decisions
//! (`plan.rs`; for rollouts the step machine `steps/` and the verdict
//! `analysis.rs`), and what the controller builds or observes.

pub mod edge_pool;
pub mod model;
pub mod rollout;
