//! What a model takes and returns: each input and output's name, datatype and
//! dimensions, with open dimensions kept apart from fixed ones.

use crate::datatype::Datatype;

/// A model's inputs and outputs, in the order tract numbers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// One named tensor of a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: Datatype,
    pub dims: Vec<Dim>,
}

/// One dimension of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// Any size. Dimensions that share a symbol (`batch`) must have the same
    /// size within one request; `None` is a dimension the model left unnamed.
    Open(Option<String>),
}

impl TensorSpec {
    /// The shape as the protocol writes it: -1 for an open dimension.
    pub fn protocol_shape(&self) -> Vec<i64> {
        self.dims
            .iter()
            .map(|dim| match dim {
                Dim::Fixed(size) => i64::try_from(*size).unwrap_or(i64::MAX),
                Dim::Open(_) => -1,
            })
            .collect()
    }

    pub fn has_open_dims(&self) -> bool {
        self.dims.iter().any(|dim| matches!(dim, Dim::Open(_)))
    }
}

impl Signature {
    /// The input names, quoted and comma-separated, for error messages.
    pub fn input_names(&self) -> String {
        names(&self.inputs)
    }

    /// The output names, quoted and comma-separated, for error messages.
    pub fn output_names(&self) -> String {
        names(&self.outputs)
    }
}

fn names(tensors: &[TensorSpec]) -> String {
    tensors
        .iter()
        .map(|tensor| format!("\"{}\"", tensor.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_dims_are_minus_one_in_metadata() {
        let spec = TensorSpec {
            name: "x".into(),
            datatype: Datatype::Fp32,
            dims: vec![Dim::Open(Some("N".into())), Dim::Fixed(3), Dim::Open(None)],
        };
        assert_eq!(spec.protocol_shape(), vec![-1, 3, -1]);
        assert!(spec.has_open_dims());
    }

    #[test]
    fn names_are_quoted_and_comma_separated() {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: Datatype::Int64,
            dims: vec![Dim::Fixed(1)],
        };
        let signature = Signature {
            inputs: vec![spec("ids"), spec("mask")],
            outputs: vec![spec("score")],
        };
        assert_eq!(signature.input_names(), "\"ids\", \"mask\"");
        assert_eq!(signature.output_names(), "\"score\"");
    }
}
