//! Real third-party models through a real agent process: magika and PP-OCR's
//! text-direction classifier must answer what onnxruntime answers (within 1e-4)
//! on seeded inputs, and a tiny queue must turn overload into fast 429s.
//! Needs SHOAL_TEST_MAGIKA_ONNX and SHOAL_TEST_PPOCR_CLS_ONNX (`make test-models`)
//! and a Python with onnxruntime in SHOAL_PYTHON (default `python3`).

mod common;

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Agent, Rng, RssSampler, model_arg, proc_status_kib, real_model, status_and_json};

const TOLERANCE: f64 = 1e-4;

/// One input tensor: name, datatype, shape, flat data.
struct Input {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<usize>,
    data: Vec<Value>,
}

/// Outputs of onnxruntime for `inputs`, by output name: (shape, flat data).
fn onnxruntime_outputs(model: &std::path::Path, inputs: &[Input]) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec: serde_json::Map<String, Value> = inputs
        .iter()
        .map(|input| {
            (
                input.name.to_string(),
                json!({"datatype": input.datatype, "shape": input.shape, "data": input.data}),
            )
        })
        .collect();
    let spec_path = dir.path().join("inputs.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).expect("json")).expect("write inputs");
    let python = std::env::var("SHOAL_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(model)
        .arg(&spec_path)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {python}: {err}"));
    assert!(
        output.status.success(),
        "{python} {script} failed ({}); it needs onnxruntime and numpy \
         (set SHOAL_PYTHON to a Python that has them):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("reference output is JSON")
}

fn infer_request(inputs: &[Input]) -> Value {
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|input| {
            json!({"name": input.name, "datatype": input.datatype, "shape": input.shape, "data": input.data})
        })
        .collect();
    json!({ "inputs": inputs })
}

/// Asserts that the agent's answer to `inputs` equals onnxruntime's.
fn assert_matches_onnxruntime(
    agent: &Agent,
    model_name: &str,
    model: &std::path::Path,
    inputs: &[Input],
) {
    let expected = onnxruntime_outputs(model, inputs);
    let (status, response) = status_and_json(agent.post_json(
        &format!("/v2/models/{model_name}/infer"),
        &infer_request(inputs),
    ));
    assert_eq!(status, 200, "{response}");
    let outputs = response["outputs"].as_array().expect("outputs");
    assert_eq!(
        outputs.len(),
        expected.as_object().expect("reference outputs").len()
    );
    for output in outputs {
        let name = output["name"].as_str().expect("output name");
        let reference = &expected[name];
        assert_eq!(output["shape"], reference["shape"], "shape of {name}");
        let ours = output["data"].as_array().expect("data");
        let theirs = reference["data"].as_array().expect("reference data");
        assert_eq!(ours.len(), theirs.len(), "length of {name}");
        let max_diff = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a.as_f64().expect("number") - b.as_f64().expect("number")).abs())
            .fold(0.0, f64::max);
        eprintln!("{model_name} {name}: max abs difference to onnxruntime {max_diff:e}");
        assert!(
            max_diff <= TOLERANCE,
            "{model_name} output {name}: max abs difference to onnxruntime is {max_diff}"
        );
    }
}

/// Magika reads up to 2048 byte values, 256 standing for padding.
fn magika_input(rng: &mut Rng, batch: usize) -> Input {
    Input {
        name: "bytes",
        datatype: "INT32",
        shape: vec![batch, 2048],
        data: (0..batch * 2048)
            .map(|_| json!(rng.next_u64() % 257))
            .collect(),
    }
}

/// An image batch for the direction classifier, values in [-1, 1) as its
/// preprocessing produces; f32 values so both runtimes see the same numbers.
fn ppocr_cls_input(rng: &mut Rng, batch: usize) -> Input {
    Input {
        name: "x",
        datatype: "FP32",
        shape: vec![batch, 3, 48, 192],
        data: (0..batch * 3 * 48 * 192)
            .map(|_| json!((rng.unit() * 2.0 - 1.0) as f32 as f64))
            .collect(),
    }
}

#[test]
fn magika_matches_onnxruntime() {
    let model = real_model("SHOAL_TEST_MAGIKA_ONNX");
    let agent = Agent::start(&[model_arg("magika", &model)]);
    let (status, metadata) = status_and_json(agent.get("/v2/models/magika"));
    assert_eq!(status, 200);
    assert_eq!(
        metadata["inputs"],
        json!([{"name": "bytes", "datatype": "INT32", "shape": [-1, 2048]}])
    );
    assert_eq!(
        metadata["outputs"],
        json!([{"name": "target_label", "datatype": "FP32", "shape": [-1, 214]}])
    );
    let mut rng = Rng::new(0x5eed_0001);
    // Magika only optimizes with a fixed batch size: batch 3 builds a second
    // plan, batch 1 reuses the warm-up plan.
    for batch in [3, 1] {
        assert_matches_onnxruntime(&agent, "magika", &model, &[magika_input(&mut rng, batch)]);
    }
}

#[test]
fn ppocr_cls_matches_onnxruntime() {
    let model = real_model("SHOAL_TEST_PPOCR_CLS_ONNX");
    let agent = Agent::start(&[model_arg("cls", &model)]);
    let mut rng = Rng::new(0x5eed_0002);
    assert_matches_onnxruntime(&agent, "cls", &model, &[ppocr_cls_input(&mut rng, 2)]);
}

/// A shape of zero elements passes the element count, but a plan for a batch of
/// 10^8 once took the agent to 8.5 GB. It must be refused before any plan exists.
#[test]
fn a_huge_batch_of_zero_elements_is_refused_before_any_plan_is_built() {
    let model = real_model("SHOAL_TEST_PPOCR_CLS_ONNX");
    let agent = Agent::start(&[model_arg("cls", &model)]);
    let pid = agent.pid();
    let mut rng = Rng::new(0x5eed_0003);
    // One real request first, so the memory it takes is in the baseline.
    let warm = agent.post_json(
        "/v2/models/cls/infer",
        &infer_request(&[ppocr_cls_input(&mut rng, 1)]),
    );
    assert_eq!(warm.status(), 200);
    let before_kib = proc_status_kib(pid, "VmHWM");
    let sampler = RssSampler::start(pid);
    let started = Instant::now();
    let (status, body) = status_and_json(agent.post_json(
        "/v2/models/cls/infer",
        &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [100000000, 3, 48, 0], "data": []}]}),
    ));
    let elapsed = started.elapsed();
    let peak_kib = sampler.stop().max(proc_status_kib(pid, "VmHWM"));
    eprintln!(
        "huge zero-element batch: HTTP {status} in {elapsed:?}; VmHWM {:.1} MiB before, {:.1} MiB after",
        before_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"],
        "input \"x\": dimension 0 (the batch) is 100000000, more than the agent's --max-batch of 64; send smaller batches"
    );
    // The issue's bound is one second; generous here for a busy 2-core machine.
    assert!(elapsed < Duration::from_secs(5), "the 400 took {elapsed:?}");
    assert!(
        peak_kib < before_kib + 100 * 1024,
        "peak RSS grew from {before_kib} KiB to {peak_kib} KiB"
    );
}

#[test]
fn overload_answers_429_fast() {
    const CLIENTS: usize = 12;
    let model = real_model("SHOAL_TEST_MAGIKA_ONNX");
    let agent = Arc::new(Agent::start(&[
        model_arg("magika", &model),
        "--workers=1".to_string(),
        "--queue=1".to_string(),
    ]));
    // Large enough that one request keeps the only worker busy while the others arrive.
    let request = Arc::new(infer_request(&[magika_input(&mut Rng::new(7), 32)]));
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (agent, request, barrier) = (agent.clone(), request.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let response = agent.post_json("/v2/models/magika/infer", &request);
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap_or("").to_string());
                let (status, body) = status_and_json(response);
                (status, retry_after, body, started.elapsed())
            })
        })
        .collect();
    let results: Vec<(u16, Option<String>, Value, Duration)> = clients
        .into_iter()
        .map(|client| client.join().expect("client thread"))
        .collect();
    let served = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(
        served + refused.len(),
        CLIENTS,
        "only 200 or 429: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    eprintln!("overload: {served} served, {} refused", refused.len());
    // One running and one queued are always admitted.
    assert!(served >= 2, "served {served}");
    assert!(!refused.is_empty(), "no request was refused");
    for (_, retry_after, body, elapsed) in &refused {
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(
            body["error"],
            "too many requests are queued for inference; retry shortly"
        );
        assert!(*elapsed < Duration::from_secs(2), "429 took {elapsed:?}");
    }
    let text = agent.get("/metrics").text().expect("metrics");
    assert!(
        text.contains(&format!(
            r#"shoal_agent_requests_total{{model="magika",version="1",code="429"}} {}"#,
            refused.len()
        )),
        "{text}"
    );
    assert!(text.contains("shoal_agent_queue_depth 0"), "{text}");
}

#[test]
fn request_over_the_timeout_gets_503() {
    let model = real_model("SHOAL_TEST_MAGIKA_ONNX");
    let agent = Agent::start(&[
        model_arg("magika", &model),
        "--request-timeout-seconds=0.001".to_string(),
    ]);
    let request = infer_request(&[magika_input(&mut Rng::new(9), 32)]);
    let response = agent.post_json("/v2/models/magika/infer", &request);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let (status, body) = status_and_json(response);
    assert_eq!(status, 503);
    assert_eq!(body["error"], "the request did not finish within 1ms");
}
