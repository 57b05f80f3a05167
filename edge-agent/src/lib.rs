//! shoal-agent: serves ONNX models on an edge node over the Open Inference
//! Protocol v2 REST API, with tract as the runtime. The binary in `main.rs`
//! wires these modules together; tests and managed mode use them directly.

pub mod admission;
pub mod cache;
pub mod control_plane;
pub mod engine;
pub mod metrics;
pub mod oip;
pub mod prepare_cache;
pub mod registry;
pub mod server;
pub mod signature;
pub mod supervise;
pub mod sync;
pub mod validation;
