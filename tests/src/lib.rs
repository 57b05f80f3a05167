//! The harness of Shoal's integration tests, which run against the local control
//! plane of `make cluster-up` (and, for `real_node`, the real node of `make node-up`).
//!
//! It comes in three tiers:
//!
//! 1. Tools, one purpose each, that any test uses on its own:
//!    - [`cluster`]: the kubeconfig, a client for the local control plane, Shoal's
//!      CRDs, a namespace per test;
//!    - [`wait`]: polling until an object reaches a condition, is gone, or a process
//!      answers on a URL;
//!    - [`ports`]: free TCP ports for the processes the tests start;
//!    - [`binaries`]: where the workspace's built binaries are;
//!    - [`operator_process`]: `shoal-operator run` as a child process;
//!    - [`agent_process`]: managed-mode `shoal-agent` processes;
//!    - [`recorded_processes`]: stopping and restarting the control plane's and the
//!      real node's processes;
//!    - [`kwok_nodes`]: fake nodes that kwok manages;
//!    - [`file_server`]: a model file served over http;
//!    - [`stall_proxy`]: a TCP proxy that can hang every call through it;
//!    - [`test_models`]: the real models `make test-models` fetches, and digests;
//!    - [`onnx_models`]: tiny ONNX models written byte by byte;
//!    - [`credentials`]: ServiceAccount tokens and throwaway TLS certificates;
//!    - [`model_objects`]: ConfigMaps of ONNX files, Models, EdgePools and
//!      ModelRollouts, and waiting on them.
//! 2. Fixtures built from the tools: [`fleet`] (a namespace with its operator, kwok
//!    nodes in EdgePools, a Model and its ModelRollout, and helpers for the agents on
//!    those nodes) and [`real_node`] (the real node and the chart installed on it).
//! 3. The tests themselves, in `tests/tests/`, and the fleet benchmark in `src/bin/`.
//!
//! The most used items are re-exported here, so that `use shoal_tests::{…}` keeps
//! working; new code imports from the module that owns a thing.

pub mod agent_process;
pub mod binaries;
pub mod cluster;
pub mod credentials;
pub mod file_server;
pub mod fleet;
pub mod kwok_nodes;
pub mod model_objects;
pub mod onnx_models;
pub mod operator_process;
pub mod ports;
pub mod real_node;
pub mod recorded_processes;
pub mod stall_proxy;
pub mod test_models;
pub mod wait;

pub use agent_process::Agent;
pub use binaries::{kubectl_shoal_binary, shoal_agent_binary};
pub use cluster::{
    FIELD_MANAGER, TestNamespace, client, install_crds, kubeconfig_path, unique_name, workspace_dir,
};
pub use credentials::{
    TestCertificate, certificate_for, pod_token, serving_certificate, unbound_token,
};
pub use file_server::serve_file;
pub use kwok_nodes::{KWOK_NODE_KEY, TEST_NODE_LABEL, create_kwok_node, delete_nodes};
pub use onnx_models::{
    bytes_field, message, scorer_onnx_model, string_input_onnx_model, tiny_onnx_model,
    tiny_onnx_model_padded, tiny_onnx_model_scaled, varint_field,
};
pub use operator_process::Operator;
pub use ports::free_port;
pub use recorded_processes::{
    start_control_plane_process, start_recorded_process, stop_control_plane_process,
    stop_recorded_process,
};
pub use test_models::{magika_onnx, ppocr_cls_onnx, recommender_dir, sha256_hex};
pub use wait::{wait_for, wait_until_gone};
