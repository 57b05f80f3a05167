//! Load generator for `make bench`: runs magika-shaped requests (INT32 [1, 2048],
//! batch 1) from C closed-loop clients for a fixed time after a warm-up, and
//! prints one JSON line with the throughput and latency percentiles.
//!
//! Two targets, driven the same way (C threads, each one request after another):
//!
//! ```text
//! loadgen tract MODEL.onnx CONCURRENCY SECONDS WARMUP_SECONDS
//! loadgen http  INFER_URL  CONCURRENCY SECONDS WARMUP_SECONDS
//! ```
//!
//! `tract` is the floor: the agent's own engine called in-process, each request
//! parsed from the same JSON body, validated, run and its outputs serialized to
//! JSON, with no HTTP. `http` POSTs that body with a keep-alive client per thread
//! (`Content-Type: application/json`, a string `id`) and counts only 200s as done.
//! Requests are bounded by time and by `LOADGEN_MAX_REQUESTS` (default 200000).
//! Never fails on timing; exits non-zero only when it cannot run at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use shoal_agent::engine::LoadedModel;
use shoal_agent::oip::InferRequest;
use shoal_agent::validation::{DEFAULT_MAX_BATCH, ShapeLimits, validate};

/// One client's view of the run.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

fn request_body() -> anyhow::Result<Vec<u8>> {
    let data: Vec<u32> = (0..2048u32).map(|i| (i * 7919) % 257).collect();
    Ok(serde_json::to_vec(&serde_json::json!({
        "id": "bench",
        "inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": data}]
    }))?)
}

/// Runs `one` in `concurrency` threads: `warmup` untimed, then `seconds` timed.
fn drive<F>(concurrency: usize, seconds: f64, warmup: f64, one: F) -> anyhow::Result<()>
where
    F: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    let max_requests: u64 = std::env::var("LOADGEN_MAX_REQUESTS")
        .ok()
        .map_or(Ok(200_000), |s| s.parse())?;
    let one = Arc::new(one);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let stop_at = measure_from + Duration::from_secs_f64(seconds);
    let clients: Vec<_> = (0..concurrency)
        .map(|_| {
            let one = Arc::clone(&one);
            let issued = Arc::clone(&issued);
            thread::spawn(move || {
                let mut tally = Tally::default();
                loop {
                    let started = Instant::now();
                    if started >= stop_at {
                        break;
                    }
                    let timed = started >= measure_from;
                    if timed && issued.fetch_add(1, Ordering::Relaxed) >= max_requests {
                        break;
                    }
                    let result = one();
                    let took = started.elapsed();
                    if !timed {
                        continue;
                    }
                    match result {
                        Ok(()) => tally.latencies.push(took),
                        Err(err) => {
                            tally.errors += 1;
                            tally.first_error.get_or_insert(err);
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for client in clients {
        let tally = client
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        latencies.extend(tally.latencies);
        errors += tally.errors;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    // The timed window ends when the last client's last request ends.
    let window = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    latencies.sort();
    let ok = latencies.len();
    println!(
        "{}",
        serde_json::json!({
            "concurrency": concurrency,
            "ok": ok,
            "errors": errors,
            "first_error": first_error,
            "seconds": window,
            "rps": ok as f64 / window,
            "p50_ms": percentile_ms(&latencies, 0.5),
            "p90_ms": percentile_ms(&latencies, 0.9),
            "p99_ms": percentile_ms(&latencies, 0.99),
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: loadgen tract|http MODEL.onnx|INFER_URL CONCURRENCY SECONDS WARMUP_SECONDS";
    let [_, mode, target, concurrency, seconds, warmup] = args.as_slice() else {
        anyhow::bail!(usage);
    };
    let concurrency: usize = concurrency.parse()?;
    anyhow::ensure!(concurrency >= 1, "CONCURRENCY must be at least 1");
    let seconds: f64 = seconds.parse()?;
    let warmup: f64 = warmup.parse()?;
    let body = request_body()?;

    match mode.as_str() {
        "tract" => {
            let bytes = std::fs::read(target)?;
            let model = Arc::new(LoadedModel::load("magika", "1", &bytes)?);
            drive(concurrency, seconds, warmup, move || {
                let request: InferRequest =
                    serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                let valid = validate(
                    &model.signature,
                    request,
                    ShapeLimits::new(DEFAULT_MAX_BATCH, 16 << 20),
                )
                .map_err(|e| e.to_string())?;
                let outputs = model.infer(&valid).map_err(|e| e.to_string())?;
                serde_json::to_vec(&outputs).map_err(|e| e.to_string())?;
                Ok(())
            })
        }
        "http" => {
            let url = target.clone();
            // One keep-alive connection per client thread.
            drive(concurrency, seconds, warmup, move || {
                thread_local! {
                    static CLIENT: reqwest::blocking::Client = reqwest::blocking::Client::builder()
                        .pool_max_idle_per_host(1)
                        .timeout(Duration::from_secs(60))
                        .build()
                        .unwrap_or_default();
                }
                CLIENT.with(|client| {
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .map_err(|e| e.to_string())?;
                    let status = response.status();
                    let text = response.bytes().map_err(|e| e.to_string())?;
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(format!(
                            "{status}: {}",
                            String::from_utf8_lossy(&text[..text.len().min(200)])
                        ))
                    }
                })
            })
        }
        _ => anyhow::bail!(usage),
    }
}
