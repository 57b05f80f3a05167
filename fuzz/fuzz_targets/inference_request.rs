//! Bytes → the edge agent's inference request decoder and validator, the path
//! every `POST /v2/models/{name}/infer` body takes before it reaches tract
//! (`server::infer_blocking`: `serde_json::from_slice::<InferRequest>` then
//! `validation::validate`). The signature has inputs of several datatypes, fixed
//! and open dimensions and a symbol shared by two inputs.
//!
//! Checks: no panic, no abort (stack overflow, out of memory); and a request that
//! validates is consistent: inputs in the model's order, each with the model's
//! rank, datatype and fixed sizes, exactly as many elements as its shape holds,
//! shared symbols of one size, and output indices inside the signature.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use shoal_agent::oip::{Datatype, InferRequest};
use shoal_agent::signature::{Dim, Signature, TensorSpec};
use shoal_agent::validation::{DEFAULT_MAX_BATCH, InputValues, ShapeLimits, validate};

static SIGNATURE: LazyLock<Signature> = LazyLock::new(|| {
    let spec = |name: &str, datatype, dims| TensorSpec {
        name: name.into(),
        datatype,
        dims,
    };
    let batch = || Dim::Open(Some("batch".into()));
    Signature {
        inputs: vec![
            spec("ids", Datatype::Int64, vec![batch(), Dim::Fixed(4)]),
            spec("mask", Datatype::Bool, vec![batch(), Dim::Fixed(4)]),
            spec(
                "pixels",
                Datatype::Fp32,
                vec![batch(), Dim::Fixed(3), Dim::Open(None)],
            ),
            spec("scale", Datatype::Fp16, vec![Dim::Fixed(1)]),
            spec("raw", Datatype::Uint8, vec![Dim::Open(Some("seq".into()))]),
        ],
        outputs: vec![
            spec("score", Datatype::Fp32, vec![batch()]),
            spec("label", Datatype::Int64, vec![batch()]),
        ],
    }
});

fn datatype_of(values: &InputValues) -> Datatype {
    match values {
        InputValues::Bool(_) => Datatype::Bool,
        InputValues::Uint8(_) => Datatype::Uint8,
        InputValues::Uint16(_) => Datatype::Uint16,
        InputValues::Uint32(_) => Datatype::Uint32,
        InputValues::Uint64(_) => Datatype::Uint64,
        InputValues::Int8(_) => Datatype::Int8,
        InputValues::Int16(_) => Datatype::Int16,
        InputValues::Int32(_) => Datatype::Int32,
        InputValues::Int64(_) => Datatype::Int64,
        InputValues::Fp16(_) => Datatype::Fp16,
        InputValues::Fp32(_) => Datatype::Fp32,
        InputValues::Fp64(_) => Datatype::Fp64,
    }
}

fn len_of(values: &InputValues) -> usize {
    match values {
        InputValues::Bool(v) => v.len(),
        InputValues::Uint8(v) => v.len(),
        InputValues::Uint16(v) => v.len(),
        InputValues::Uint32(v) => v.len(),
        InputValues::Uint64(v) => v.len(),
        InputValues::Int8(v) => v.len(),
        InputValues::Int16(v) => v.len(),
        InputValues::Int32(v) => v.len(),
        InputValues::Int64(v) => v.len(),
        InputValues::Fp16(v) | InputValues::Fp32(v) => v.len(),
        InputValues::Fp64(v) => v.len(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<InferRequest>(data) else {
        return;
    };
    let signature = &*SIGNATURE;
    let Ok(valid) = validate(
        signature,
        request,
        ShapeLimits::new(DEFAULT_MAX_BATCH, 16 << 20),
    ) else {
        return;
    };
    assert_eq!(valid.inputs.len(), signature.inputs.len());
    let mut symbols = std::collections::HashMap::new();
    for (spec, input) in signature.inputs.iter().zip(&valid.inputs) {
        assert_eq!(datatype_of(&input.values), spec.datatype, "{}", spec.name);
        assert_eq!(input.shape.len(), spec.dims.len(), "{}", spec.name);
        for (dim, &size) in spec.dims.iter().zip(&input.shape) {
            match dim {
                Dim::Fixed(fixed) => assert_eq!(*fixed, size, "{}", spec.name),
                Dim::Open(Some(symbol)) => {
                    assert_eq!(*symbols.entry(symbol.clone()).or_insert(size), size)
                }
                Dim::Open(None) => {}
            }
        }
        let elements = input
            .shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .expect("a valid shape's element count fits usize");
        assert_eq!(elements, len_of(&input.values), "{}", spec.name);
    }
    assert!(valid.outputs.iter().all(|&o| o < signature.outputs.len()));
});
