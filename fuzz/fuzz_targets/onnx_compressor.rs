//! Bytes → `shoal_operator::compression::compress`, what the Model controller and
//! `shoal-operator compress` run on a model file fetched from outside: int8 (per
//! tensor or per channel) or fp16, validated on one synthetic sample. Inputs are
//! cut at 64 KiB.
//!
//! Checks: `compress` returns Ok or Err; it never panics past its own guards and
//! never aborts (out of memory, stack overflow). The operator runs with
//! `panic = "unwind"` and catches tract's panics where it calls into tract, so a
//! panic caught inside `compress` is fine; libfuzzer-sys's panic hook would abort
//! on it, though, so this target installs a quiet hook and treats only a panic
//! that escapes `compress` as a crash.
#![no_main]

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};

use libfuzzer_sys::fuzz_target;
use shoal_api::CompressionMode;
use shoal_operator::compression::{Gate, Granularity, Options, compress};

const MAX_INPUT: usize = 64 * 1024;

fn options(mode: CompressionMode, granularity: Granularity) -> Options {
    Options {
        mode,
        granularity,
        samples: 1,
        dataset: None,
        gate: Gate {
            max_abs_error: Some(0.5),
            min_top1_agreement: None,
        },
    }
}

thread_local! {
    /// The last panic on this thread, message and place, for the crash report.
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

fuzz_target!(
    init: {
        // Replace libfuzzer-sys's abort-on-panic hook: panics that `compress`
        // catches itself are part of its contract.
        panic::set_hook(Box::new(|info| {
            LAST_PANIC.with(|last| *last.borrow_mut() = info.to_string());
        }));
    },
    |data: &[u8]| {
        if data.len() > MAX_INPUT {
            return;
        }
        // The mode from the input's length, so the seed models stay plain ONNX files.
        let (mode, granularity) = match data.len() % 3 {
            0 => (CompressionMode::Int8, Granularity::PerTensor),
            1 => (CompressionMode::Int8, Granularity::PerChannel),
            _ => (CompressionMode::Fp16, Granularity::PerTensor),
        };
        let options = options(mode, granularity);
        let result = panic::catch_unwind(AssertUnwindSafe(|| compress(data, &options, |_| {})));
        match result {
            Ok(Ok(compressed)) => {
                assert!(!compressed.bytes.is_empty());
                assert_eq!(compressed.report.source_bytes, data.len() as u64);
            }
            Ok(Err(_)) => {}
            Err(_) => {
                let panic = LAST_PANIC.with(|last| last.borrow().clone());
                eprintln!("compress ({mode:?}, {granularity:?}) let a panic escape: {panic}");
                std::process::abort();
            }
        }
    }
);
