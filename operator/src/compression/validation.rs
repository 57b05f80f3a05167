//! The accuracy gate: runs the original and the compressed model in tract on the
//! same inputs and measures how far apart their outputs are.
//!
//! Figures: the largest and the mean absolute difference over every output value,
//! and the top-1 agreement: over every row of every output whose last axis is longer
//! than 1 (class scores, item scores), the fraction of rows where both models pick
//! the same argmax. Models without such an output have no top-1 figure.

use std::collections::HashMap;
use std::sync::Arc;

use shoal_api::ValidationFigures;
use tract_onnx::prelude::{
    Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, IntoTensor, Symbol,
    TDim, TValue, Tensor, ToDim, TractResult, TypedSimplePlan,
};
use tract_onnx::tract_hir::infer::Factoid;

use super::samples::Sample;

/// The thresholds a compressed model must meet; an unset one is not enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gate {
    pub max_abs_error: Option<f64>,
    pub min_top1_agreement: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("tract could not run the {which} model on validation sample {sample}: {reason}")]
    Run {
        which: &'static str,
        sample: usize,
        reason: String,
    },

    #[error(
        "on validation sample {sample}, output `{output}` of the compressed model is {compressed} where \
         the original gives {original}; the compression broke the model"
    )]
    NonFinite {
        sample: usize,
        output: String,
        original: f64,
        compressed: f64,
    },

    #[error(
        "the two models disagree on the shape of output {output} on sample {sample} ({original:?} vs {compressed:?})"
    )]
    ShapeMismatch {
        sample: usize,
        output: usize,
        original: Vec<usize>,
        compressed: Vec<usize>,
    },
}

/// Whether `figures` meet `gate`; the error says which threshold failed, with every figure.
pub fn check_gate(figures: &ValidationFigures, gate: &Gate) -> Result<(), String> {
    let mut failures = Vec::new();
    if let Some(limit) = gate.max_abs_error
        && figures.max_abs_error > limit
    {
        failures.push(format!(
            "max abs error {} > maxAbsError {limit}",
            short(figures.max_abs_error)
        ));
    }
    if let Some(minimum) = gate.min_top1_agreement {
        match figures.top1_agreement {
            Some(agreement) if agreement < minimum => failures.push(format!(
                "top-1 agreement {} < minTop1Agreement {minimum}",
                short(agreement)
            )),
            Some(_) => {}
            None => failures.push(
                "minTop1Agreement is set but no output has a class axis (last axis longer than 1); \
                 remove minTop1Agreement and gate on maxAbsError"
                    .to_string(),
            ),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} ({})",
            failures.join(" and "),
            describe(figures)
        ))
    }
}

/// "max abs error 0.0123, mean abs error 0.0011, top-1 agreement 0.984 over 32 samples".
pub fn describe(figures: &ValidationFigures) -> String {
    let top1 = figures
        .top1_agreement
        .map(|a| format!(", top-1 agreement {}", short(a)))
        .unwrap_or_default();
    format!(
        "max abs error {}, mean abs error {}{top1} over {} samples",
        short(figures.max_abs_error),
        short(figures.mean_abs_error),
        figures.samples
    )
}

fn short(value: f64) -> String {
    format!("{value:.4e}")
        .parse::<f64>()
        .map_or_else(|_| value.to_string(), |v| v.to_string())
}

/// Loads both models, runs every sample through each and compares the outputs.
/// `progress(done, total)` is called after each sample. CPU-heavy and synchronous.
pub fn compare(
    original: &[u8],
    compressed: &[u8],
    samples: &[Sample],
    mut progress: impl FnMut(usize, usize),
) -> Result<ValidationFigures, ValidationError> {
    let mut original = Runner::load(original, "original")?;
    let mut compressed = Runner::load(compressed, "compressed")?;
    let mut totals = Totals::default();
    for (index, sample) in samples.iter().enumerate() {
        let expected = original.run(sample, index)?;
        let actual = compressed.run(sample, index)?;
        totals.add(index, &expected, &actual, &original.output_names)?;
        progress(index + 1, samples.len());
    }
    Ok(totals.figures(samples.len()))
}

/// A model and its plans, one per set of input shapes seen.
struct Runner {
    which: &'static str,
    model: InferenceModel,
    plans: HashMap<Vec<Vec<usize>>, Arc<TypedSimplePlan>>,
    output_names: Vec<String>,
}

impl Runner {
    fn load(bytes: &[u8], which: &'static str) -> Result<Runner, ValidationError> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| ValidationError::Run {
                which,
                sample: 0,
                reason: format!("{e:#}"),
            })?;
        let output_names = model
            .outputs
            .iter()
            .map(|outlet| model.node(outlet.node).name.clone())
            .collect();
        Ok(Runner {
            which,
            model,
            plans: HashMap::new(),
            output_names,
        })
    }

    fn run(&mut self, sample: &Sample, index: usize) -> Result<Vec<Tensor>, ValidationError> {
        let failed = |e: tract_onnx::prelude::TractError| ValidationError::Run {
            which: self.which,
            sample: index,
            reason: format!("{e:#}"),
        };
        let shapes: Vec<Vec<usize>> = sample.iter().map(|t| t.shape().to_vec()).collect();
        if !self.plans.contains_key(&shapes) {
            let plan = plan_for(&self.model, sample).map_err(failed)?;
            self.plans.insert(shapes.clone(), plan);
        }
        let plan = &self.plans[&shapes];
        let inputs = sample.iter().cloned().map(TValue::from).collect();
        // tract panics on some inputs a model cannot take (an out-of-range Gather
        // index, for one): that is a failed run, not a reason to lose the worker.
        let outputs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.run(inputs)))
            .map_err(|payload| ValidationError::Run {
                which: self.which,
                sample: index,
                reason: format!("tract panicked: {}", panic_message(payload.as_ref())),
            })?
            .map_err(failed)?;
        Ok(outputs.into_iter().map(|v| v.into_tensor()).collect())
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

/// An optimized plan for the concrete shapes and types of `sample`. Symbols the
/// graph uses for open input dimensions get the sample's sizes, so value_info that
/// mentions them stays consistent.
fn plan_for(model: &InferenceModel, sample: &Sample) -> TractResult<Arc<TypedSimplePlan>> {
    let mut model = model.clone();
    let mut symbols: HashMap<Symbol, TDim> = HashMap::new();
    for (ix, tensor) in sample.iter().enumerate() {
        let declared = model.input_fact(ix)?.clone();
        if !declared.shape.is_open() {
            for (dim, size) in declared.shape.dims().zip(tensor.shape()) {
                if let Some(TDim::Sym(symbol)) = dim.concretize() {
                    symbols.insert(symbol, size.to_dim());
                }
            }
        }
        model.set_input_fact(
            ix,
            InferenceFact::dt_shape(tensor.datum_type(), tensor.shape()),
        )?;
    }
    model.set_symbols(&symbols)?;
    model.into_optimized()?.into_runnable()
}

#[derive(Default)]
struct Totals {
    max_abs: f64,
    sum_abs: f64,
    values: u64,
    rows: u64,
    rows_agreeing: u64,
}

impl Totals {
    fn add(
        &mut self,
        sample: usize,
        expected: &[Tensor],
        actual: &[Tensor],
        names: &[String],
    ) -> Result<(), ValidationError> {
        for (output, (e, a)) in expected.iter().zip(actual).enumerate() {
            if e.shape() != a.shape() {
                return Err(ValidationError::ShapeMismatch {
                    sample,
                    output,
                    original: e.shape().to_vec(),
                    compressed: a.shape().to_vec(),
                });
            }
            let (Some(e_values), Some(a_values)) = (as_f64(e), as_f64(a)) else {
                continue; // strings: nothing to measure
            };
            for (x, y) in e_values.iter().zip(&a_values) {
                if x == y || (x.is_nan() && y.is_nan()) {
                    self.values += 1;
                    continue;
                }
                if !x.is_finite() || !y.is_finite() {
                    return Err(ValidationError::NonFinite {
                        sample,
                        output: names.get(output).cloned().unwrap_or_default(),
                        original: *x,
                        compressed: *y,
                    });
                }
                let diff = (x - y).abs();
                self.max_abs = self.max_abs.max(diff);
                self.sum_abs += diff;
                self.values += 1;
            }
            let classes = e.shape().last().copied().unwrap_or(1);
            if classes > 1 {
                for (row_e, row_a) in e_values.chunks(classes).zip(a_values.chunks(classes)) {
                    self.rows += 1;
                    if argmax(row_e) == argmax(row_a) {
                        self.rows_agreeing += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn figures(&self, samples: usize) -> ValidationFigures {
        ValidationFigures {
            samples: samples as u32,
            max_abs_error: self.max_abs,
            mean_abs_error: if self.values == 0 {
                0.0
            } else {
                self.sum_abs / self.values as f64
            },
            top1_agreement: (self.rows > 0).then(|| self.rows_agreeing as f64 / self.rows as f64),
        }
    }
}

fn as_f64(tensor: &Tensor) -> Option<Vec<f64>> {
    let cast = tensor.cast_to::<f64>().ok()?;
    let view = cast.to_plain_array_view::<f64>().ok()?;
    Some(view.iter().copied().collect())
}

/// Index of the largest value; the first one on ties; NaN never wins.
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(max: f64, top1: Option<f64>) -> ValidationFigures {
        ValidationFigures {
            samples: 32,
            max_abs_error: max,
            mean_abs_error: max / 10.0,
            top1_agreement: top1,
        }
    }

    #[test]
    fn gate_holds_at_its_thresholds_and_fails_just_past_them() {
        let gate = Gate {
            max_abs_error: Some(0.01),
            min_top1_agreement: Some(0.99),
        };
        assert_eq!(check_gate(&figures(0.01, Some(0.99)), &gate), Ok(()));
        let err = check_gate(&figures(0.0101, Some(0.99)), &gate).expect_err("fails");
        assert!(
            err.starts_with("max abs error 0.0101 > maxAbsError 0.01 ("),
            "{err}"
        );
        let err = check_gate(&figures(0.001, Some(0.98)), &gate).expect_err("fails");
        assert!(
            err.contains("top-1 agreement 0.98 < minTop1Agreement 0.99"),
            "{err}"
        );
        assert!(err.contains("over 32 samples"), "{err}");
        let err = check_gate(&figures(1.0, Some(0.5)), &gate).expect_err("fails");
        assert!(err.contains(" and "), "both failures named: {err}");
    }

    #[test]
    fn unset_thresholds_are_not_enforced_and_top1_needs_a_class_axis() {
        assert_eq!(
            check_gate(&figures(100.0, Some(0.0)), &Gate::default()),
            Ok(())
        );
        let gate = Gate {
            max_abs_error: None,
            min_top1_agreement: Some(0.5),
        };
        let err = check_gate(&figures(0.0, None), &gate).expect_err("no class axis");
        assert!(err.contains("remove minTop1Agreement"), "{err}");
    }

    #[test]
    fn totals_measure_errors_and_row_agreement() {
        let e = Tensor::from_shape(&[2, 3], &[0.1f32, 0.9, 0.0, 0.5, 0.2, 0.3]).expect("tensor");
        let a = Tensor::from_shape(&[2, 3], &[0.1f32, 0.8, 0.0, 0.1, 0.2, 0.3]).expect("tensor");
        let mut totals = Totals::default();
        totals.add(0, &[e], &[a], &["y".into()]).expect("adds");
        let f = totals.figures(1);
        assert!((f.max_abs_error - 0.4).abs() < 1e-6, "{f:?}");
        assert!((f.mean_abs_error - 0.5 / 6.0).abs() < 1e-6, "{f:?}");
        // Row 0 agrees (index 1); row 1 flips from 0 to 2.
        assert_eq!(f.top1_agreement, Some(0.5));
    }

    #[test]
    fn a_new_infinity_is_an_error_not_a_figure() {
        let e = Tensor::from_shape(&[1], &[1.0f32]).expect("tensor");
        let a = Tensor::from_shape(&[1], &[f32::INFINITY]).expect("tensor");
        let err = Totals::default()
            .add(3, &[e], &[a], &["y".into()])
            .expect_err("non-finite");
        assert!(err.to_string().contains("sample 3"), "{err}");
    }

    #[test]
    fn argmax_prefers_the_first_of_equals_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f64::NAN, 0.5, 0.2]), 1);
    }
}
