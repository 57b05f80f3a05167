//! Shared by the integration tests: runs the real `shoal-agent` binary on an
//! ephemeral 127.0.0.1 port, builds tiny ONNX models, finds the real test models
//! and makes deterministic inputs.

#![allow(dead_code)] // each test file uses a different part of this module

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension;

/// A running agent process; killed when dropped.
pub struct Agent {
    child: Child,
    pub base: String,
    pub client: reqwest::blocking::Client,
}

impl Agent {
    /// Starts the agent with `args` (models, limits) and waits until it listens.
    pub fn start(args: &[String]) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shoal-agent");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (address_tx, address_rx) = mpsc::channel();
        // Keeps draining stderr for the agent's whole life, so its logging
        // never blocks on a full pipe; echoes it for failing tests.
        std::thread::spawn(move || {
            let mut address_tx = Some(address_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("agent: {line}");
                let Ok(log) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if log["fields"]["message"] == "listening"
                    && let Some(tx) = address_tx.take()
                {
                    let address = log["fields"]["address"].as_str().unwrap_or("").to_string();
                    let _ = tx.send(address);
                }
            }
        });
        let address = match address_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().expect("wait for agent");
                panic!("shoal-agent did not start listening ({status}); see its log above");
            }
        };
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        Agent {
            child,
            base: format!("http://{address}"),
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.client.get(self.url(path)).send().expect("GET")
    }

    /// POSTs a JSON value with `Content-Type: application/json`.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::blocking::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .expect("POST")
    }

    pub fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::blocking::Response {
        let mut request = self.client.post(self.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().expect("POST")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status and parsed JSON body of a response.
pub fn status_and_json(response: reqwest::blocking::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let mut text = String::new();
    let mut response = response;
    response.read_to_string(&mut text).expect("read body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("body is not JSON ({err}): {text}"));
    (status, json)
}

/// The path of a real model from the environment; the test fails without it.
pub fn real_model(env_var: &str) -> PathBuf {
    let Ok(path) = std::env::var(env_var) else {
        panic!(
            "{env_var} is not set: run `make test-models` and run the tests through make \
             (the Makefile exports {env_var}), or export it yourself"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{env_var}={} does not exist: run `make test-models`",
        path.display()
    );
    path
}

pub fn model_arg(name: &str, path: &Path) -> String {
    format!("--model={name}={}", path.display())
}

/// A small deterministic generator (xorshift64*), so inputs are the same on
/// every run without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub enum Dim {
    Fixed(i64),
    Named(&'static str),
}

pub fn value_info(name: &str, elem_type: DataType, dims: &[Dim]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => dimension::Value::DimValue(*v),
                Dim::Named(s) => dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn node(op_type: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op_type.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: output.to_string(),
        ..Default::default()
    }
}

pub fn model_bytes(graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "shoal-test".to_string(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// "mixed": a: FP64 [N,3] -> a2 = a + a; b: INT64 [N,3] -> b2 = b + b;
/// c: BOOL [N,3] -> c2 = not c. One batch symbol N shared by all inputs.
pub fn mixed_model() -> Vec<u8> {
    let n = || Dim::Named("N");
    model_bytes(pb::GraphProto {
        name: "mixed".to_string(),
        node: vec![
            node("Add", &["a", "a"], "a2"),
            node("Add", &["b", "b"], "b2"),
            node("Not", &["c"], "c2"),
        ],
        input: vec![
            value_info("a", DataType::Double, &[n(), Dim::Fixed(3)]),
            value_info("b", DataType::Int64, &[n(), Dim::Fixed(3)]),
            value_info("c", DataType::Bool, &[n(), Dim::Fixed(3)]),
        ],
        output: vec![
            value_info("a2", DataType::Double, &[n(), Dim::Fixed(3)]),
            value_info("b2", DataType::Int64, &[n(), Dim::Fixed(3)]),
            value_info("c2", DataType::Bool, &[n(), Dim::Fixed(3)]),
        ],
        ..Default::default()
    })
}

/// "half": h: FP16 [2] -> h2 = h + h, fixed shape.
pub fn half_model() -> Vec<u8> {
    model_bytes(pb::GraphProto {
        name: "half".to_string(),
        node: vec![node("Add", &["h", "h"], "h2")],
        input: vec![value_info("h", DataType::Float16, &[Dim::Fixed(2)])],
        output: vec![value_info("h2", DataType::Float16, &[Dim::Fixed(2)])],
        ..Default::default()
    })
}

/// Writes `bytes` to a file in `dir` and returns its path.
pub fn write_model(dir: &Path, file: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, bytes).expect("write model file");
    path
}

impl Agent {
    /// The agent's process id, to read its memory from `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:<port>`, for raw TCP clients.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`), 0 if unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Samples a process's VmRSS every 50 ms until stopped; `stop` returns the peak.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(proc_status_kib(pid, "VmRSS"));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak.max(proc_status_kib(pid, "VmRSS"))
        });
        RssSampler { stop, thread }
    }

    /// Peak VmRSS seen, in KiB.
    pub fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the RSS sampler panicked")
    }
}
