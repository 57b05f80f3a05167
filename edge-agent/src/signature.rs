//! What a loaded model takes and returns: each input and output's name, datatype
//! and dimensions, with open dimensions kept apart from fixed ones. Requests are
//! checked against it and model metadata is written from it.

use crate::oip::{Datatype, MetadataTensor};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: Datatype,
    pub dims: Vec<Dim>,
}

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

    pub fn metadata(&self) -> MetadataTensor {
        MetadataTensor {
            name: self.name.clone(),
            datatype: self.datatype,
            shape: self.protocol_shape(),
        }
    }

    pub fn has_open_dims(&self) -> bool {
        self.dims.iter().any(|dim| matches!(dim, Dim::Open(_)))
    }
}

impl Signature {
    pub fn input_names(&self) -> String {
        names(&self.inputs)
    }

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
}
