//! Why a model is refused: the one error type of reading and checking a model,
//! with messages that say what to change.

use crate::datatype::Unservable;

/// Why bytes are not a model Shoal agents can serve.
#[derive(Debug, thiserror::Error)]
pub enum InvalidModel {
    #[error(
        "the artifact is not an ONNX model ({reason}); check that the source points at the .onnx \
         file itself, not an archive, a web page or a model in another format"
    )]
    NotOnnx { reason: String },

    #[error(
        "the artifact is not a loadable ONNX model: {reason}; agents run models with tract, so \
         re-export the model with operators tract supports (ONNX opset 9 to 18) and declared input shapes"
    )]
    Unloadable { reason: String },

    /// A tensor whose element type agents do not serve (a string, a bfloat16).
    #[error("the model's {role} `{name}` {why}")]
    UnservableTensor {
        role: &'static str,
        name: String,
        why: Unservable,
    },

    #[error(
        "the model's input `{name}` declares no {missing}; agents need the element type and the \
         rank of every input: re-export the model with typed inputs (a dimension such as the \
         batch size may stay open)"
    )]
    UndeclaredInput { name: String, missing: &'static str },
}

impl InvalidModel {
    /// A short, fixed label for the `reason` of an error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            InvalidModel::NotOnnx { .. } => "not_onnx",
            InvalidModel::Unloadable { .. } => "unloadable",
            InvalidModel::UnservableTensor { .. } => "unsupported_datatype",
            InvalidModel::UndeclaredInput { .. } => "undeclared_input",
        }
    }
}

/// Whether a tensor is an input or an output of the model, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Input,
    Output,
}

impl Role {
    pub fn word(self) -> &'static str {
        match self {
            Role::Input => "input",
            Role::Output => "output",
        }
    }
}
