//! Shoal's operator as a library; `main.rs` wires it into the `shoal-operator` binary.
//!
//! The rooms, and the one rule between them (ARCHITECTURE.md has the picture):
//!
//! - [`controllers`]: one folder per custom resource (Model, EdgePool, ModelRollout),
//!   each with the same rooms: `controller.rs`, the thin I/O shell that reads,
//!   carries out and writes status; `plan.rs` (for rollouts `steps/` and
//!   `analysis.rs`), the pure decisions; and what the controller builds or observes.
//! - [`fleet`]: the in-memory state of the fleet, built from watches and agent reports.
//! - [`placement`]: pure logic of who serves what: canary cohorts and assignments.
//! - [`agent_api`]: the HTTP API edge agents dial home to; HTTP only.
//! - [`artifacts`]: the content-addressed artifact store and the http fetch of sources.
//! - [`compression`]: int8 / fp16 compression with its accuracy gate, and the
//!   `compress` command.
//! - [`runtime`]: what every controller shares: context, backoff, leader election,
//!   metrics, the HTTP endpoints, the reconcile wrapper, status writes, object keys
//!   and condition reasons.
//!
//! `controllers` and `agent_api` both use `fleet`, `placement`, `artifacts` and
//! `runtime`; neither uses the other.

pub mod agent_api;
pub mod artifacts;
pub mod compression;
pub mod controllers;
pub mod fleet;
pub mod placement;
pub mod runtime;
