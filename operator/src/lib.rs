//! Shoal's operator as a library: the controllers, the artifact store and the
//! pieces they share. `main.rs` wires them into the `shoal-operator` binary.

pub mod agent_api;
pub mod artifact_store;
pub mod backoff;
pub mod compress_command;
pub mod compression;
pub mod context;
pub mod edge_pool_controller;
pub mod edge_pool_daemonset;
pub mod fetch;
pub mod http_server;
pub mod leader;
pub mod metrics;
pub mod model_controller;
pub mod model_plan;
pub mod onnx_signature;
pub mod rollout;
