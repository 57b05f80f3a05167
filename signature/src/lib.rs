//! What an ONNX model takes and returns, in Open Inference Protocol terms, and
//! whether Shoal agents can serve it. Shared by the operator (admission, the
//! validation samples of compression) and the edge agent (loading, request
//! validation), so the two cannot disagree about a model. Free of I/O: bytes in,
//! values out.
//!
//! - [`datatype`]: the protocol's datatypes, their mapping to tract's element
//!   types and the rule for which ones agents serve.
//! - [`tensor`]: a signature: named tensors with datatypes and dimensions.
//! - [`read`]: decoding ONNX bytes into tract's graph and the declared signature.
//! - [`check`]: the operator's admission check, which also types and optimizes.
//! - [`error`]: why a model is refused.

pub mod check;
pub mod datatype;
pub mod error;
pub mod read;
pub mod tensor;

#[cfg(test)]
mod test_onnx;

pub use check::read_signature;
pub use datatype::{Datatype, Unservable, servable_datatype};
pub use error::InvalidModel;
pub use read::{DeclaredOutput, OnnxModel, complete_outputs, read_onnx};
pub use tensor::{Dim, Signature, TensorSpec};
