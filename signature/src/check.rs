//! The admission check: reads a model's signature and proves tract can type and
//! optimize it, so a model agents cannot serve is refused once, at the operator,
//! instead of failing on every edge node.

use std::collections::{HashMap, HashSet};
use std::panic::{self, AssertUnwindSafe};

use tract_onnx::prelude::{
    InferenceModel, InferenceModelExt, Symbol, TDim, TVec, ToDim, TractResult, TypedFact,
};
use tract_onnx::tract_hir::infer::{DimFact, Factoid, ShapeFactoid};

use crate::error::InvalidModel;
use crate::read::{OnnxModel, complete_outputs, read_onnx};
use crate::tensor::Signature;

/// Parses `bytes` as ONNX, returns its signature, and checks that tract can type
/// and optimize it and that agents serve every datatype it uses.
///
/// The signature is what the graph declares; where it declares no datatype or
/// shape (often the case for outputs) it is what tract's analysis computes.
///
/// The load check first leaves open dimensions (the batch size, say) symbolic.
/// Some graphs only type with fixed sizes in tract (magika, a jax2tf export, is
/// one: it builds a shape tensor from the batch size), so if that fails the check
/// is repeated with every open input dimension set to 1, which is how an agent can
/// still serve such a model. Only when both fail is the model invalid.
///
/// CPU-heavy and synchronous: call it from `spawn_blocking` or a worker thread.
pub fn read_signature(bytes: &[u8]) -> Result<Signature, InvalidModel> {
    // tract panics on some malformed models (it has `unimplemented!` paths for
    // unusual tensor encodings). The bytes come from outside, so a panic is one
    // more way for a model to be invalid, not a reason to lose the worker.
    match panic::catch_unwind(AssertUnwindSafe(|| read_signature_unguarded(bytes))) {
        Ok(result) => result,
        Err(payload) => Err(InvalidModel::Unloadable {
            reason: format!(
                "tract panicked while reading it: {}",
                panic_message(payload.as_ref())
            ),
        }),
    }
}

/// The message of a caught panic, for an error that replaces it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

fn read_signature_unguarded(bytes: &[u8]) -> Result<Signature, InvalidModel> {
    let OnnxModel {
        model,
        inputs,
        declared_outputs,
    } = read_onnx(bytes)?;

    let (analysed_outputs, dims_are_general) =
        match type_and_optimize(model.clone(), OpenDims::Symbolic) {
            Ok(analysed) => (analysed, true),
            // With fixed sizes the analysed output shapes hold for size 1 only.
            Err(_symbolic_error) => match type_and_optimize(model, OpenDims::One) {
                Ok(analysed) => (analysed, false),
                // The error with fixed sizes is the more fundamental one: the
                // model cannot be loaded at all.
                Err(err) => {
                    return Err(InvalidModel::Unloadable {
                        // `{:#}` prints the whole chain, stage first, root cause last.
                        reason: format!("{err:#}"),
                    });
                }
            },
        };

    Ok(Signature {
        inputs,
        outputs: complete_outputs(declared_outputs, &analysed_outputs, dims_are_general)?,
    })
}

/// How to pin input dimensions the graph leaves open before typing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenDims {
    /// Named dims stay symbols; unnamed ones get a fresh symbol, because tract
    /// cannot type a source whose shape is not fully known.
    Symbolic,
    /// Every open dim becomes 1.
    One,
}

/// Types and optimizes the model; returns the facts of its outputs as typing
/// found them.
fn type_and_optimize(
    mut model: InferenceModel,
    open_dims: OpenDims,
) -> TractResult<Vec<TypedFact>> {
    pin_open_input_dims(&mut model, open_dims)?;
    let typed = model
        .into_typed()
        .map_err(|err| err.context("shape and type analysis failed"))?;
    let outputs = (0..typed.outputs.len())
        .map(|ix| typed.output_fact(ix).cloned())
        .collect::<TractResult<_>>()?;
    typed
        .into_optimized()
        .map_err(|err| err.context("tract could not optimize it"))?;
    Ok(outputs)
}

/// Gives every input dimension the graph leaves open a symbol or the size 1, so
/// that tract can type the graph.
pub fn pin_open_input_dims(model: &mut InferenceModel, open_dims: OpenDims) -> TractResult<()> {
    let mut symbols = HashSet::new();
    for ix in 0..model.inputs.len() {
        let mut fact = model.input_fact(ix)?.clone();
        // Unknown rank: nothing to pin; analysis decides whether that is fatal.
        if fact.shape.is_open() {
            continue;
        }
        let dims: TVec<DimFact> = fact
            .shape
            .dims()
            .map(|dim| match (dim.concretize(), open_dims) {
                (Some(dim), _) => {
                    symbols.extend(dim.symbols());
                    DimFact::from(dim)
                }
                (None, OpenDims::Symbolic) => {
                    DimFact::from(model.symbols.new_with_prefix("unnamed").to_dim())
                }
                (None, OpenDims::One) => DimFact::from(TDim::from(1)),
            })
            .collect();
        fact.shape = ShapeFactoid::closed(dims);
        model.set_input_fact(ix, fact)?;
    }
    if let OpenDims::One = open_dims {
        let ones: HashMap<Symbol, TDim> = symbols
            .into_iter()
            .map(|symbol| (symbol, TDim::from(1)))
            .collect();
        // Substitutes in every declared fact, so value_info that mentions the
        // batch symbol stays consistent with the inputs.
        model.set_symbols(&ones)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Dim as SpecDim;
    use crate::test_onnx::{
        Dim, add_bias_model, described, model, node, string_input_model, tensor, untyped,
        value_info,
    };
    use tract_onnx::pb;
    use tract_onnx::pb::tensor_proto::DataType;

    #[test]
    fn garbage_is_not_onnx() {
        let err = read_signature(b"<html><body>404 Not Found</body></html>")
            .expect_err("garbage must be refused");
        let message = err.to_string();
        assert!(
            message.starts_with("the artifact is not an ONNX model"),
            "{message}"
        );
        assert!(
            message.contains("protobuf") || message.contains("graph"),
            "{message}"
        );
        assert_eq!(err.metric_label(), "not_onnx");
    }

    #[test]
    fn empty_bytes_are_not_onnx() {
        let err = read_signature(b"").expect_err("empty must be refused");
        assert_eq!(err.metric_label(), "not_onnx", "{err}");
    }

    #[test]
    fn reads_declared_input_and_analysed_output() {
        let bytes = add_bias_model(&[Dim::Named("N"), Dim::Fixed(4)]);
        let signature = read_signature(&bytes).expect("valid model");
        assert_eq!(
            described(&signature.inputs),
            vec![tensor("x", "FP32", &[-1, 4])]
        );
        assert_eq!(
            described(&signature.outputs),
            vec![tensor("y", "FP32", &[-1, 4])]
        );
        // The agent checks that dims sharing a symbol have one size per request.
        assert_eq!(
            signature.inputs[0].dims,
            vec![SpecDim::Open(Some("N".to_string())), SpecDim::Fixed(4)]
        );
    }

    #[test]
    fn unnamed_dimension_is_open() {
        let bytes = add_bias_model(&[Dim::Unnamed, Dim::Fixed(4)]);
        let signature = read_signature(&bytes).expect("valid model");
        assert_eq!(
            described(&signature.inputs),
            vec![tensor("x", "FP32", &[-1, 4])]
        );
        assert_eq!(signature.inputs[0].dims[0], SpecDim::Open(None));
    }

    /// PP-OCR writes `?` for its open image sizes: tract leaves such dims
    /// unnamed, so two of them need not have the same size in a request.
    #[test]
    fn question_mark_dimension_is_open_and_unnamed() {
        let bytes = add_bias_model(&[Dim::Named("?"), Dim::Fixed(4)]);
        let signature = read_signature(&bytes).expect("valid model");
        assert_eq!(
            signature.inputs[0].dims,
            vec![SpecDim::Open(None), SpecDim::Fixed(4)]
        );
    }

    #[test]
    fn declared_types_map_to_oip_names() {
        let bytes = model(pb::GraphProto {
            name: "identity".to_string(),
            node: vec![
                node("Identity", &["ids"], "ids_out"),
                node("Identity", &["mask"], "mask_out"),
            ],
            input: vec![
                value_info(
                    "ids",
                    DataType::Int64,
                    &[Dim::Named("batch"), Dim::Named("seq")],
                ),
                value_info("mask", DataType::Bool, &[Dim::Fixed(2), Dim::Fixed(3)]),
            ],
            output: vec![
                value_info(
                    "ids_out",
                    DataType::Int64,
                    &[Dim::Named("batch"), Dim::Named("seq")],
                ),
                value_info("mask_out", DataType::Bool, &[Dim::Fixed(2), Dim::Fixed(3)]),
            ],
            ..Default::default()
        });
        let signature = read_signature(&bytes).expect("valid model");
        assert_eq!(
            described(&signature.inputs),
            vec![
                tensor("ids", "INT64", &[-1, -1]),
                tensor("mask", "BOOL", &[2, 3])
            ]
        );
        assert_eq!(
            described(&signature.outputs),
            vec![
                tensor("ids_out", "INT64", &[-1, -1]),
                tensor("mask_out", "BOOL", &[2, 3])
            ]
        );
    }

    #[test]
    fn unknown_operator_is_unloadable_with_tract_reason() {
        let bytes = model(pb::GraphProto {
            name: "mystery".to_string(),
            node: vec![node("NoSuchOperator", &["x"], "y")],
            input: vec![value_info("x", DataType::Float, &[Dim::Fixed(1)])],
            output: vec![value_info("y", DataType::Float, &[Dim::Fixed(1)])],
            ..Default::default()
        });
        let err = read_signature(&bytes).expect_err("unknown operator must be refused");
        let message = err.to_string();
        assert!(
            message.starts_with("the artifact is not a loadable ONNX model: "),
            "{message}"
        );
        assert!(message.contains("NoSuchOperator"), "{message}");
        assert_eq!(err.metric_label(), "unloadable");
    }

    #[test]
    fn datatype_oip_cannot_carry_is_refused() {
        let bytes = model(pb::GraphProto {
            name: "bf16".to_string(),
            node: vec![node("Identity", &["x"], "y")],
            input: vec![value_info("x", DataType::Bfloat16, &[Dim::Fixed(2)])],
            output: vec![value_info("y", DataType::Bfloat16, &[Dim::Fixed(2)])],
            ..Default::default()
        });
        let err = read_signature(&bytes).expect_err("bfloat16 must be refused");
        assert_eq!(err.metric_label(), "unsupported_datatype", "{err}");
        let message = err.to_string();
        assert!(message.contains("input `x`"), "{message}");
        assert!(message.contains("BFLOAT16"), "{message}");
    }

    /// tract loads a graph of string tensors, but agents serve none: admission
    /// must refuse it and say which tensor is a string and what to change.
    #[test]
    fn string_input_is_refused_with_what_to_change() {
        for declare_output in [true, false] {
            let err = read_signature(&string_input_model(declare_output))
                .expect_err("a string input must be refused");
            assert_eq!(err.metric_label(), "unsupported_datatype", "{err}");
            let message = err.to_string();
            assert!(
                message.starts_with("the model's input `text` is a string tensor"),
                "{message}"
            );
            assert!(
                message.contains("numeric and bool tensors only"),
                "{message}"
            );
            assert!(
                message.contains("export the model with numeric inputs"),
                "{message}"
            );
            assert!(message.contains("outside the model"), "{message}");
        }
    }

    #[test]
    fn string_output_is_refused_too() {
        // x: int64[1] → Cast(to = STRING) → words, declared or found by analysis.
        for declared in [true, false] {
            let cast = pb::NodeProto {
                attribute: vec![pb::AttributeProto {
                    name: "to".to_string(),
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    i: DataType::String as i64,
                    ..Default::default()
                }],
                ..node("Cast", &["x"], "words")
            };
            let output = if declared {
                value_info("words", DataType::String, &[Dim::Fixed(1)])
            } else {
                untyped("words")
            };
            let bytes = model(pb::GraphProto {
                name: "to_words".to_string(),
                node: vec![cast],
                input: vec![value_info("x", DataType::Int64, &[Dim::Fixed(1)])],
                output: vec![output],
                ..Default::default()
            });
            let err = read_signature(&bytes).expect_err("a string output must be refused");
            let message = err.to_string();
            assert!(
                message.starts_with("the model's output `words` is a string tensor"),
                "declared {declared}: {message}"
            );
        }
    }

    #[test]
    fn input_without_a_type_is_refused() {
        let bytes = model(pb::GraphProto {
            name: "untyped".to_string(),
            node: vec![node("Identity", &["x"], "y")],
            input: vec![untyped("x")],
            output: vec![untyped("y")],
            ..Default::default()
        });
        let err = read_signature(&bytes).expect_err("an untyped input must be refused");
        assert_eq!(err.metric_label(), "undeclared_input", "{err}");
        assert!(
            err.to_string()
                .contains("input `x` declares no element type"),
            "{err}"
        );
    }

    #[test]
    fn tract_panic_becomes_invalid_model() {
        // tract has no raw-bytes decoding for string tensors and panics on one.
        let strings = pb::TensorProto {
            name: "words".to_string(),
            dims: vec![1],
            data_type: DataType::String as i32,
            raw_data: b"abc".to_vec(),
            ..Default::default()
        };
        let bytes = model(pb::GraphProto {
            name: "raw_strings".to_string(),
            node: vec![node("Identity", &["words"], "y")],
            initializer: vec![strings],
            output: vec![untyped("y")],
            ..Default::default()
        });
        let err = read_signature(&bytes).expect_err("must be refused");
        assert_eq!(err.metric_label(), "unloadable", "{err}");
    }

    #[test]
    fn magika_model_signature() {
        let Ok(path) = std::env::var("SHOAL_TEST_MAGIKA_ONNX") else {
            eprintln!("skipping magika_model_signature: SHOAL_TEST_MAGIKA_ONNX is not set");
            return;
        };
        let bytes = std::fs::read(&path).expect("read magika model");
        let signature = read_signature(&bytes).expect("magika loads");
        // Magika's graph only types with a fixed batch size in tract 0.23, so this
        // also covers the fallback that pins open dimensions to 1; the signature
        // still reports the batch as open because the graph declares it so.
        assert_eq!(
            described(&signature.inputs),
            vec![tensor("bytes", "INT32", &[-1, 2048])]
        );
        assert_eq!(
            described(&signature.outputs),
            vec![tensor("target_label", "FP32", &[-1, 214])]
        );
    }
}
