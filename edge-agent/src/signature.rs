//! What a loaded model takes and returns: each input and output's name, datatype
//! and dimensions, with open dimensions kept apart from fixed ones. Requests are
//! checked against it and model metadata is written from it. The types are the
//! operator's too; they live in shoal-signature.

pub use shoal_signature::{Dim, Signature, TensorSpec};
