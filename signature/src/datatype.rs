//! Tensor element types in Open Inference Protocol terms, and the one rule that
//! says which of tract's element types Shoal agents serve.
//!
//! The operator asks [`servable_datatype`] when it admits a model and the agent
//! asks it when it loads one, so the two cannot disagree about a model.

use std::fmt;

use serde::Serialize;
use tract_onnx::prelude::DatumType;

/// A tensor element type that Shoal agents serve, spelled the way the Open
/// Inference Protocol spells it.
///
/// The protocol also has BYTES (strings) and BF16; agents serve neither, so they
/// are not datatypes here: [`Datatype::parse`] refuses them and a model that uses
/// them is refused before any agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Datatype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
}

impl Datatype {
    /// Every datatype, in the order the protocol's documentation lists them.
    pub const ALL: [Datatype; 12] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Fp32,
        Datatype::Fp64,
    ];

    /// The protocol's name: "FP32", "INT64", "BOOL", ...
    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
        }
    }

    /// The datatype a protocol name stands for; `None` for names agents do not
    /// carry (BYTES, BF16) and for names that are not datatypes at all. Names are
    /// upper case, as the protocol writes them.
    pub fn parse(name: &str) -> Option<Datatype> {
        Datatype::ALL
            .into_iter()
            .find(|datatype| datatype.as_str() == name)
    }

    pub fn is_float(self) -> bool {
        matches!(self, Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64)
    }

    /// The datatype of a tract element type; `None` for the types agents do not
    /// serve. Use [`servable_datatype`] to also learn why.
    pub fn from_datum_type(datum_type: DatumType) -> Option<Datatype> {
        let datatype = match datum_type {
            DatumType::Bool => Datatype::Bool,
            DatumType::U8 => Datatype::Uint8,
            DatumType::U16 => Datatype::Uint16,
            DatumType::U32 => Datatype::Uint32,
            DatumType::U64 => Datatype::Uint64,
            DatumType::I8 => Datatype::Int8,
            DatumType::I16 => Datatype::Int16,
            DatumType::I32 => Datatype::Int32,
            DatumType::I64 => Datatype::Int64,
            DatumType::F16 => Datatype::Fp16,
            DatumType::F32 => Datatype::Fp32,
            DatumType::F64 => Datatype::Fp64,
            // Analysis types shape arithmetic as TDim; in ONNX it is an int64 tensor.
            DatumType::TDim => Datatype::Int64,
            _ => return None,
        };
        Some(datatype)
    }

    /// The tract element type tensors of this datatype have.
    pub fn datum_type(self) -> DatumType {
        match self {
            Datatype::Bool => DatumType::Bool,
            Datatype::Uint8 => DatumType::U8,
            Datatype::Uint16 => DatumType::U16,
            Datatype::Uint32 => DatumType::U32,
            Datatype::Uint64 => DatumType::U64,
            Datatype::Int8 => DatumType::I8,
            Datatype::Int16 => DatumType::I16,
            Datatype::Int32 => DatumType::I32,
            Datatype::Int64 => DatumType::I64,
            Datatype::Fp16 => DatumType::F16,
            Datatype::Fp32 => DatumType::F32,
            Datatype::Fp64 => DatumType::F64,
        }
    }
}

impl fmt::Display for Datatype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Datatype {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Why agents cannot serve tensors of some element type. The message completes
/// "the model's input `x` ..." and says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unservable {
    #[error(
        "is a string tensor (ONNX STRING, Open Inference Protocol BYTES); Shoal agents serve \
         numeric and bool tensors only: export the model with numeric inputs and outputs, or do \
         the string preprocessing (tokenizing, say) outside the model"
    )]
    String,

    #[error(
        "has element type {type_name}, which Shoal agents cannot serve; agents serve numeric and \
         bool tensors only (BOOL, UINT8 to UINT64, INT8 to INT64, FP16, FP32, FP64): re-export \
         the model with one of those element types"
    )]
    Other { type_name: String },
}

/// The one rule for which element types agents serve: the datatype of a tract
/// element type, or why agents cannot serve it.
pub fn servable_datatype(datum_type: DatumType) -> Result<Datatype, Unservable> {
    match Datatype::from_datum_type(datum_type) {
        Some(datatype) => Ok(datatype),
        None if datum_type == DatumType::String => Err(Unservable::String),
        None => Err(Unservable::Other {
            type_name: format!("{datum_type:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for name in [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64",
        ] {
            let datatype = Datatype::parse(name).expect("known");
            assert_eq!(datatype.as_str(), name);
            assert_eq!(datatype.to_string(), name);
        }
        assert_eq!(Datatype::parse("BYTES"), None);
        assert_eq!(Datatype::parse("fp32"), None);
    }

    #[test]
    fn every_datatype_maps_to_tract_and_back() {
        for datatype in Datatype::ALL {
            assert_eq!(
                Datatype::from_datum_type(datatype.datum_type()),
                Some(datatype)
            );
        }
        assert_eq!(
            Datatype::from_datum_type(DatumType::TDim),
            Some(Datatype::Int64)
        );
    }

    #[test]
    fn strings_are_not_servable_and_the_reason_says_what_to_do() {
        let why = servable_datatype(DatumType::String).expect_err("strings are refused");
        assert_eq!(why, Unservable::String);
        let message = why.to_string();
        assert!(message.contains("string tensor"), "{message}");
        assert!(
            message.contains("numeric and bool tensors only"),
            "{message}"
        );
        assert!(message.contains("outside the model"), "{message}");
    }

    #[test]
    fn other_unservable_types_are_named() {
        let why = servable_datatype(DatumType::Blob).expect_err("blobs are refused");
        assert!(why.to_string().contains("Blob"), "{why}");
        assert_eq!(servable_datatype(DatumType::F32), Ok(Datatype::Fp32));
    }
}
