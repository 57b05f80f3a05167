//! Measures single-request latency of magika-shaped requests (INT32 [1, 2048]):
//! in-process through the engine, and over HTTP against a running agent, so the
//! agent's overhead over plain tract can be read off. Not a pass/fail test.
//!
//! cargo run --release -p shoal-agent --example latency -- MODEL.onnx [INFER_URL] [RUNS]

use std::time::{Duration, Instant};

use shoal_agent::engine::LoadedModel;
use shoal_agent::oip::InferRequest;
use shoal_agent::validation::{DEFAULT_MAX_BATCH, ShapeLimits, validate};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what:<28} n={:<5} p50={:>8.3} ms  p90={:>8.3} ms  p99={:>8.3} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.9).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
    );
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(model_path) = args.get(1) else {
        anyhow::bail!("usage: latency MODEL.onnx [INFER_URL] [RUNS]");
    };
    let url = args.get(2).filter(|s| !s.is_empty());
    let runs: usize = args.get(3).map_or(Ok(300), |s| s.parse())?;

    let data: Vec<u32> = (0..2048u32).map(|i| (i * 7919) % 257).collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": data}]
    }))?;

    let bytes = std::fs::read(model_path)?;
    let started = Instant::now();
    let model = LoadedModel::load("magika", "1", &bytes)?;
    println!(
        "load + optimize + warm-up: {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    let request: InferRequest = serde_json::from_slice(&body)?;
    let valid = validate(
        &model.signature,
        request,
        ShapeLimits::new(DEFAULT_MAX_BATCH, 16 << 20),
    )?;
    let mut engine = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        model.infer(&valid)?;
        engine.push(started.elapsed());
    }
    report("in-process engine.infer", engine);

    let mut full = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let request: InferRequest = serde_json::from_slice(&body)?;
        let valid = validate(
            &model.signature,
            request,
            ShapeLimits::new(DEFAULT_MAX_BATCH, 16 << 20),
        )?;
        let outputs = model.infer(&valid)?;
        serde_json::to_vec(&outputs)?;
        full.push(started.elapsed());
    }
    report("in-process parse+infer+json", full);

    if let Some(url) = url {
        let client = reqwest::blocking::Client::new();
        let mut http = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()?;
            anyhow::ensure!(response.status().is_success(), "{}", response.status());
            response.bytes()?;
            http.push(started.elapsed());
        }
        report("HTTP round trip (keep-alive)", http);
    }
    Ok(())
}
