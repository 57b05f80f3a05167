//! `shoal-operator compress`: the compressor as a command. Prints the JSON report on
//! stdout and progress on stderr; writes the output only when the gate holds.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use shoal_api::CompressionMode;

use crate::compression::{self, Gate, Granularity, Progress};

#[derive(clap::Args)]
pub struct CompressArgs {
    /// The ONNX model to compress.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the compressed model (only written when the gate holds).
    #[arg(long)]
    pub output: PathBuf,
    /// int8: weight-only int8 with DequantizeLinear; fp16: float16 weights with a Cast.
    #[arg(long, value_enum)]
    pub mode: ModeArg,
    /// One int8 scale per output channel instead of per tensor (needs opset >= 13).
    #[arg(long)]
    pub per_channel: bool,
    /// Number of inputs to compare original and compressed on.
    #[arg(long, default_value_t = shoal_api::model::DEFAULT_VALIDATION_SAMPLES as usize)]
    pub samples: usize,
    /// Real inputs instead of synthetic ones: JSON Lines, one Open Inference Protocol
    /// request body per line.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Fail if any output value differs by more than this.
    #[arg(long)]
    pub max_abs_error: Option<f64>,
    /// Fail if the models pick the same top-1 class on less than this fraction (0..1).
    #[arg(long)]
    pub min_top1_agreement: Option<f64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    Int8,
    Fp16,
}

/// Exit codes: 0 written, 1 the gate failed (nothing written), 2 the input or options
/// are unusable.
pub fn run(args: CompressArgs) -> anyhow::Result<i32> {
    let source = std::fs::read(&args.input)
        .with_context(|| format!("could not read {}", args.input.display()))?;
    let dataset = match &args.dataset {
        Some(path) => Some(
            std::fs::read(path).with_context(|| format!("could not read {}", path.display()))?,
        ),
        None => None,
    };
    let options = compression::Options {
        mode: match args.mode {
            ModeArg::Int8 => CompressionMode::Int8,
            ModeArg::Fp16 => CompressionMode::Fp16,
        },
        granularity: if args.per_channel {
            Granularity::PerChannel
        } else {
            Granularity::PerTensor
        },
        samples: args.samples.max(1),
        dataset,
        gate: Gate {
            max_abs_error: args.max_abs_error,
            min_top1_agreement: args.min_top1_agreement,
        },
    };
    let mut display = ProgressDisplay::new();
    let compressed = match compression::compress(&source, &options, |p| display.show(p)) {
        Ok(compressed) => compressed,
        Err(error) => {
            display.finish();
            eprintln!("error: {error}");
            return Ok(2);
        }
    };
    display.finish();
    println!("{}", serde_json::to_string_pretty(&compressed.report)?);
    if let Some(failure) = &compressed.report.gate.failure {
        eprintln!(
            "the compressed model failed its validation gate: {failure}; {} not written",
            args.output.display()
        );
        return Ok(1);
    }
    write_atomically(&args.output, &compressed.bytes)?;
    eprintln!(
        "wrote {} ({} -> {} bytes, {}x)",
        args.output.display(),
        compressed.report.source_bytes,
        compressed.report.artifact_bytes,
        compressed.report.ratio
    );
    Ok(0)
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("could not write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("could not write {}", path.display()))?;
    Ok(())
}

/// One status line on stderr: redrawn in place on a terminal, a line per stage (and
/// per tenth of the samples) otherwise.
struct ProgressDisplay {
    terminal: bool,
    last_tenth: usize,
    drawn: bool,
}

impl ProgressDisplay {
    fn new() -> Self {
        ProgressDisplay {
            terminal: std::io::stderr().is_terminal(),
            last_tenth: usize::MAX,
            drawn: false,
        }
    }

    fn show(&mut self, progress: Progress) {
        let line = match progress {
            Progress::Inspecting => "inspecting the model with tract".to_string(),
            Progress::Rewriting => "rewriting weights".to_string(),
            Progress::Validating { done, total } => {
                let tenth = done * 10 / total.max(1);
                if !self.terminal && tenth == self.last_tenth {
                    return;
                }
                self.last_tenth = tenth;
                let filled = done * 20 / total.max(1);
                format!(
                    "validating [{}{}] {done}/{total} samples",
                    "#".repeat(filled),
                    ".".repeat(20 - filled)
                )
            }
        };
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(stderr, "\r\x1b[2K{line}");
            self.drawn = true;
        } else {
            let _ = writeln!(stderr, "{line}");
        }
        let _ = stderr.flush();
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}
