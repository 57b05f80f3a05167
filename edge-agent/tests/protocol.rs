//! The Open Inference Protocol v2 REST API of a real agent process, over HTTP on
//! 127.0.0.1, with tiny models built here: health, metadata, inference with every
//! datatype, the outputs filter, and every way a request is refused.

mod common;

use serde_json::{Value, json};

use common::{Agent, half_model, mixed_model, model_arg, status_and_json, write_model};

struct Fixture {
    agent: Agent,
    _dir: tempfile::TempDir,
}

/// An agent serving "mixed" (version "7") and "half" (version "1").
fn start(extra_args: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let mixed = write_model(dir.path(), "mixed.onnx", &mixed_model());
    let half = write_model(dir.path(), "half.onnx", &half_model());
    let mut args = vec![model_arg("mixed:7", &mixed), model_arg("half", &half)];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    Fixture {
        agent: Agent::start(&args),
        _dir: dir,
    }
}

fn mixed_request() -> Value {
    json!({
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP64", "data": [0.1, 0.2, 0.3, 1e-300, -2.5, 7.0]},
            {"name": "b", "shape": [2, 3], "datatype": "INT64", "data": [1, -2, 3, 4611686018427387903_i64, 5, -6]},
            {"name": "c", "shape": [2, 3], "datatype": "BOOL", "data": [true, false, true, false, false, true]}
        ]
    })
}

const MIXED_INFER: &str = "/v2/models/mixed/infer";

/// Posts `body` to the mixed model and returns status and error text.
fn error_of(fixture: &Fixture, body: &Value) -> (u16, String) {
    let (status, json) = status_and_json(fixture.agent.post_json(MIXED_INFER, body));
    let error = json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error text: {json}"));
    (status, error.to_string())
}

/// The mixed request with input `index` changed by `change`.
fn mixed_with(index: usize, change: impl FnOnce(&mut Value)) -> Value {
    let mut request = mixed_request();
    change(&mut request["inputs"][index]);
    request
}

#[test]
fn health_and_server_metadata() {
    let fixture = start(&[]);
    let agent = &fixture.agent;
    assert_eq!(agent.get("/v2/health/live").status(), 200);
    assert_eq!(agent.get("/v2/health/ready").status(), 200);
    assert_eq!(agent.get("/healthz").status(), 200);
    assert_eq!(agent.get("/readyz").status(), 200);
    let (status, metadata) = status_and_json(agent.get("/v2"));
    assert_eq!(status, 200);
    assert_eq!(metadata["name"], "shoal-agent");
    assert_eq!(metadata["version"], env!("CARGO_PKG_VERSION"));
    assert!(metadata["extensions"].is_array(), "{metadata}");
}

#[test]
fn model_metadata_and_readiness() {
    let fixture = start(&[]);
    let agent = &fixture.agent;
    let expected = json!({
        "name": "mixed",
        "versions": ["7"],
        "platform": "onnx",
        "inputs": [
            {"name": "a", "datatype": "FP64", "shape": [-1, 3]},
            {"name": "b", "datatype": "INT64", "shape": [-1, 3]},
            {"name": "c", "datatype": "BOOL", "shape": [-1, 3]}
        ],
        "outputs": [
            {"name": "a2", "datatype": "FP64", "shape": [-1, 3]},
            {"name": "b2", "datatype": "INT64", "shape": [-1, 3]},
            {"name": "c2", "datatype": "BOOL", "shape": [-1, 3]}
        ]
    });
    assert_eq!(
        status_and_json(agent.get("/v2/models/mixed")),
        (200, expected.clone())
    );
    assert_eq!(
        status_and_json(agent.get("/v2/models/mixed/versions/7")),
        (200, expected)
    );
    let (status, half) = status_and_json(agent.get("/v2/models/half"));
    assert_eq!(status, 200);
    assert_eq!(
        half["inputs"],
        json!([{"name": "h", "datatype": "FP16", "shape": [2]}])
    );
    assert_eq!(
        status_and_json(agent.get("/v2/models/mixed/ready")),
        (200, json!({"name": "mixed", "ready": true}))
    );
    assert_eq!(agent.get("/v2/models/mixed/versions/7/ready").status(), 200);
}

#[test]
fn unknown_model_and_version_are_404() {
    let fixture = start(&[]);
    let agent = &fixture.agent;
    for path in ["/v2/models/nope", "/v2/models/nope/ready"] {
        let (status, body) = status_and_json(agent.get(path));
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"], "model \"nope\" is not served here", "{path}");
    }
    let (status, body) = status_and_json(agent.get("/v2/models/mixed/versions/8"));
    assert_eq!(status, 404);
    assert_eq!(
        body["error"],
        "model \"mixed\" has no version \"8\" here (serving version \"7\")"
    );
    let (status, body) =
        status_and_json(agent.post_json("/v2/models/nope/infer", &mixed_request()));
    assert_eq!(status, 404);
    assert_eq!(body["error"], "model \"nope\" is not served here");
    let (status, body) =
        status_and_json(agent.post_json("/v2/models/mixed/versions/1/infer", &mixed_request()));
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("no version \"1\""),
        "{body}"
    );
    let (status, body) = status_and_json(agent.get("/v2/nothing/here"));
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no such route: /v2/nothing/here");
}

#[test]
fn infers_fp64_int64_bool_with_id_echo() {
    let fixture = start(&[]);
    let mut request = mixed_request();
    request["id"] = json!("request-42");
    request["parameters"] = json!({"anything": 1});
    let (status, response) = status_and_json(fixture.agent.post_json(MIXED_INFER, &request));
    assert_eq!(status, 200, "{response}");
    assert_eq!(
        response,
        json!({
            "model_name": "mixed",
            "model_version": "7",
            "id": "request-42",
            "outputs": [
                {"name": "a2", "datatype": "FP64", "shape": [2, 3], "data": [0.2, 0.4, 0.6, 2e-300, -5.0, 14.0]},
                {"name": "b2", "datatype": "INT64", "shape": [2, 3], "data": [2, -4, 6, 9223372036854775806_i64, 10, -12]},
                {"name": "c2", "datatype": "BOOL", "shape": [2, 3], "data": [false, true, false, true, true, false]}
            ]
        })
    );
}

#[test]
fn versioned_infer_and_no_id_without_request_id() {
    let fixture = start(&[]);
    let (status, response) = status_and_json(
        fixture
            .agent
            .post_json("/v2/models/mixed/versions/7/infer", &mixed_request()),
    );
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["model_version"], "7");
    assert!(response.get("id").is_none(), "{response}");
}

#[test]
fn outputs_filter_returns_only_the_named_outputs_in_order() {
    let fixture = start(&[]);
    let mut request = mixed_request();
    request["outputs"] =
        json!([{"name": "c2"}, {"name": "a2", "parameters": {"binary_data": false}}]);
    let (status, response) = status_and_json(fixture.agent.post_json(MIXED_INFER, &request));
    assert_eq!(status, 200, "{response}");
    let names: Vec<&str> = response["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|o| o["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["c2", "a2"]);
}

#[test]
fn nested_data_equals_flat_data() {
    let fixture = start(&[]);
    let nested = json!({
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP64", "data": [[0.1, 0.2, 0.3], [1e-300, -2.5, 7.0]]},
            {"name": "b", "shape": [2, 3], "datatype": "INT64", "data": [[1, -2, 3], [4611686018427387903_i64, 5, -6]]},
            {"name": "c", "shape": [2, 3], "datatype": "BOOL", "data": [[true, false, true], [false, false, true]]}
        ]
    });
    let (status, from_nested) = status_and_json(fixture.agent.post_json(MIXED_INFER, &nested));
    assert_eq!(status, 200, "{from_nested}");
    let (_, from_flat) = status_and_json(fixture.agent.post_json(MIXED_INFER, &mixed_request()));
    assert_eq!(from_nested, from_flat);
}

#[test]
fn other_batch_sizes_run_on_the_same_model() {
    let fixture = start(&[]);
    let request = json!({
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]},
            {"name": "b", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
            {"name": "c", "shape": [1, 3], "datatype": "BOOL", "data": [true, true, true]}
        ]
    });
    let (status, response) = status_and_json(fixture.agent.post_json(MIXED_INFER, &request));
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["outputs"][0]["data"], json!([2.0, 4.0, 6.0]));
    assert_eq!(response["outputs"][0]["shape"], json!([1, 3]));
}

#[test]
fn fp16_travels_as_json_numbers() {
    let fixture = start(&[]);
    let request =
        json!({"inputs": [{"name": "h", "shape": [2], "datatype": "FP16", "data": [1.5, -0.25]}]});
    let (status, response) =
        status_and_json(fixture.agent.post_json("/v2/models/half/infer", &request));
    assert_eq!(status, 200, "{response}");
    assert_eq!(
        response["outputs"],
        json!([{"name": "h2", "datatype": "FP16", "shape": [2], "data": [3.0, -0.5]}])
    );
}

#[test]
fn unknown_input_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(0, |input| input["name"] = json!("z"));
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            r#"input "z": the model has no such input (its inputs: "a", "b", "c")"#.to_string()
        )
    );
}

#[test]
fn missing_input_is_400() {
    let fixture = start(&[]);
    let mut request = mixed_request();
    request["inputs"].as_array_mut().expect("inputs").remove(1);
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            r#"input "b" is missing (the model's inputs: "a", "b", "c")"#.to_string()
        )
    );
}

#[test]
fn wrong_datatype_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(1, |input| input["datatype"] = json!("INT32"));
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            "input \"b\": expected datatype INT64, got INT32".to_string()
        )
    );
}

#[test]
fn wrong_rank_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(0, |input| input["shape"] = json!([6]));
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            "input \"a\": expected shape [-1, 3] (rank 2), got [6] (rank 1)".to_string()
        )
    );
}

#[test]
fn wrong_dimension_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(0, |input| input["shape"] = json!([3, 2]));
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            "input \"a\": dimension 1 must be 3 (shape [-1, 3]), got 2".to_string()
        )
    );
}

#[test]
fn inconsistent_batch_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(2, |input| {
        input["shape"] = json!([1, 3]);
        input["data"] = json!([true, true, true]);
    });
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            "input \"c\": dimension 0 (N) is 1, but it is 2 in input \"a\"".to_string()
        )
    );
}

#[test]
fn element_count_mismatch_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(0, |input| input["data"] = json!([1, 2, 3, 4, 5]));
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            "input \"a\": shape [2, 3] holds 6 elements, but data has 5".to_string()
        )
    );
}

#[test]
fn non_numeric_data_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(0, |input| input["data"] = json!([1, 2, "3", 4, 5, 6]));
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            "input \"a\": data[2] is a string; datatype FP64 takes numbers".to_string()
        )
    );
}

#[test]
fn bool_for_number_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(1, |input| input["data"] = json!([1, 2, 3, true, 5, 6]));
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            "input \"b\": data[3] is a boolean; datatype INT64 takes numbers".to_string()
        )
    );
}

#[test]
fn number_for_bool_is_400() {
    let fixture = start(&[]);
    let request = mixed_with(2, |input| input["data"] = json!([1, 0, 1, 0, 0, 1]));
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            "input \"c\": data[0] is a number; datatype BOOL takes true or false".to_string()
        )
    );
}

#[test]
fn unknown_output_is_400() {
    let fixture = start(&[]);
    let mut request = mixed_request();
    request["outputs"] = json!([{"name": "d2"}]);
    assert_eq!(
        error_of(&fixture, &request),
        (
            400,
            r#"output "d2": the model has no such output (its outputs: "a2", "b2", "c2")"#
                .to_string()
        )
    );
}

#[test]
fn bad_json_is_400() {
    let fixture = start(&[]);
    let (status, body) = status_and_json(fixture.agent.post_raw(
        MIXED_INFER,
        Some("application/json"),
        b"{\"inputs\": [".to_vec(),
    ));
    assert_eq!(status, 400);
    let error = body["error"].as_str().unwrap_or("");
    assert!(
        error.starts_with("the request body is not a valid inference request: EOF"),
        "{error}"
    );
}

#[test]
fn missing_inputs_field_is_400() {
    let fixture = start(&[]);
    let (status, body) = status_and_json(fixture.agent.post_json(MIXED_INFER, &json!({"id": "1"})));
    assert_eq!(status, 400);
    let error = body["error"].as_str().unwrap_or("");
    assert!(error.contains("missing field `inputs`"), "{error}");
}

#[test]
fn wrong_content_type_is_400() {
    let body = serde_json::to_vec(&mixed_request()).expect("json");
    let fixture = start(&[]);
    let (status, response) = status_and_json(fixture.agent.post_raw(
        MIXED_INFER,
        Some("text/plain"),
        body.clone(),
    ));
    assert_eq!(status, 400);
    assert_eq!(
        response["error"],
        "unsupported content type \"text/plain\": send the request as application/json"
    );
    // No content type at all is taken as JSON: tritonclient sends none.
    let (status, _) = status_and_json(fixture.agent.post_raw(MIXED_INFER, None, body));
    assert_eq!(status, 200);
}

#[test]
fn too_large_body_is_413() {
    let fixture = start(&["--max-body-bytes", "4096"]);
    let mut request = mixed_request();
    request["id"] = json!("x".repeat(8192));
    let (status, body) = status_and_json(fixture.agent.post_json(MIXED_INFER, &request));
    assert_eq!(status, 413);
    assert_eq!(
        body["error"],
        "the request body is larger than the limit of 4096 bytes"
    );
    // Under the limit it is served.
    assert_eq!(
        fixture
            .agent
            .post_json(MIXED_INFER, &mixed_request())
            .status(),
        200
    );
}

#[test]
fn metrics_count_requests_by_model_version_and_code() {
    let fixture = start(&[]);
    let agent = &fixture.agent;
    assert_eq!(agent.post_json(MIXED_INFER, &mixed_request()).status(), 200);
    let bad = mixed_with(1, |input| input["datatype"] = json!("INT32"));
    assert_eq!(agent.post_json(MIXED_INFER, &bad).status(), 400);
    let response = agent.get("/metrics");
    assert_eq!(response.status(), 200);
    let text = response.text().expect("metrics text");
    for expected in [
        r#"shoal_agent_requests_total{model="mixed",version="7",code="200"} 1"#,
        r#"shoal_agent_requests_total{model="mixed",version="7",code="400"} 1"#,
        r#"shoal_agent_request_duration_seconds_count{model="mixed",version="7"} 2"#,
        r#"shoal_agent_model_loaded{model="mixed",version="7"} 1"#,
        r#"shoal_agent_model_loaded{model="half",version="1"} 1"#,
        r#"shoal_agent_model_load_seconds{model="mixed",version="7"} "#,
        "shoal_agent_queue_depth 0",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // Payloads never reach the metrics.
    assert!(!text.contains("4611686018427387903"), "{text}");
}
