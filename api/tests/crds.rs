//! The generated CRDs as the API server will see them: structural schemas, the CEL
//! rules evaluated on real manifests (with kube-cel, the evaluator behind kube's `cel`
//! feature), defaults, list markers, printer columns, and manifests that round-trip
//! through the Rust types.

use kube::CustomResourceExt;
use serde_json::{Value, json};
use shoal_api::{
    AgentSettings, AnalysisStep, CompressionMode, EdgePool, Model, ModelPhase, ModelRollout,
    RolloutPhase, RolloutStep, crds,
};

const MODEL_HTTP: &str = include_str!("manifests/model-http.yaml");
const MODEL_CONFIGMAP: &str = include_str!("manifests/model-configmap.yaml");
const MODEL_STATUS: &str = include_str!("manifests/model-status.yaml");
const EDGEPOOL: &str = include_str!("manifests/edgepool.yaml");
const MODELROLLOUT: &str = include_str!("manifests/modelrollout.yaml");

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).expect("fixture is YAML")
}

/// The openAPIV3Schema of a CRD as JSON.
fn schema_of<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema");
    serde_json::to_value(schema).expect("schema is JSON")
}

/// The schema at a dotted path of property names, e.g. "spec.source.http".
fn at<'a>(schema: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(schema, |s, name| {
        let s = if name == "items" {
            &s["items"]
        } else {
            &s["properties"][name]
        };
        assert!(!s.is_null(), "no schema at {path} (stuck at {name})");
        s
    })
}

fn rules(schema: &Value) -> Vec<(&str, &str)> {
    schema["x-kubernetes-validations"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    (
                        r["rule"].as_str().unwrap_or_default(),
                        r["message"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Structural schemas

/// Walks a schema the way the API server's structural check does, collecting
/// everything that would make it reject the CRD.
fn structural_problems(schema: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        problems.push(format!("{path}: schema is not an object"));
        return;
    };
    for forbidden in [
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "uniqueItems",
        "const",
    ] {
        if obj.contains_key(forbidden) {
            problems.push(format!("{path}: has {forbidden}"));
        }
    }
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&json!(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if !obj.contains_key("type") && !int_or_string && !preserve {
        problems.push(format!("{path}: has no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        problems.push(format!("{path}: both properties and additionalProperties"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            structural_problems(prop, &format!("{path}.{name}"), problems);
        }
    }
    if let Some(items) = obj.get("items") {
        structural_problems(items, &format!("{path}[]"), problems);
    }
    if let Some(extra) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        structural_problems(extra, &format!("{path}{{}}"), problems);
    }
    if obj.get("x-kubernetes-list-type") == Some(&json!("map")) {
        let keys = obj["x-kubernetes-list-map-keys"].as_array().cloned();
        let required = obj["items"]["required"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for key in keys.unwrap_or_default() {
            let defaulted = obj["items"]["properties"][key.as_str().unwrap_or_default()]
                .get("default")
                .is_some();
            if !required.contains(&key) && !defaulted {
                problems.push(format!(
                    "{path}: list-map key {key} is neither required nor defaulted"
                ));
            }
        }
    }
}

/// Every property in the schema, with its path.
fn properties<'a>(schema: &'a Value, path: &str, out: &mut Vec<(String, &'a Value)>) {
    if let Some(props) = schema["properties"].as_object() {
        for (name, prop) in props {
            let path = format!("{path}.{name}");
            properties(prop, &path, out);
            out.push((path, prop));
        }
    }
    if schema["items"].is_object() {
        properties(&schema["items"], &format!("{path}[]"), out);
    }
}

#[test]
fn schemas_are_structural() {
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("json");
        let mut problems = vec![];
        structural_problems(&schema["openAPIV3Schema"], &name, &mut problems);
        assert!(
            problems.is_empty(),
            "{name} is not structural: {problems:#?}"
        );
    }
}

#[test]
fn every_field_has_explain_text() {
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("json");
        let root = &schema["openAPIV3Schema"];
        assert!(root["description"].as_str().is_some_and(|d| d.len() > 20));
        let mut props = vec![];
        properties(root, "", &mut props);
        let missing: Vec<_> = props
            .iter()
            .filter(|(path, _)| path != ".apiVersion" && path != ".kind" && path != ".metadata")
            .filter(|(_, p)| p["description"].as_str().is_none_or(str::is_empty))
            .map(|(path, _)| path.clone())
            .collect();
        assert!(
            missing.is_empty(),
            "{name}: fields without a description: {missing:#?}"
        );
    }
}

/// `kubectl explain edgepool.spec.agent.hostPort` must say what binding a port
/// on the nodes costs before anyone sets it.
#[test]
fn host_port_explain_text_warns_about_every_node() {
    let crd = crds()
        .into_iter()
        .find(|crd| crd.spec.names.kind == "EdgePool")
        .expect("EdgePool CRD");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("json");
    let text = at(&schema["openAPIV3Schema"], "spec.agent.hostPort")["description"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for needed in ["every node the pool selects", "stays Pending", "1 to 65535"] {
        assert!(text.contains(needed), "{needed:?} missing from: {text}");
    }
    assert!(!text.contains('\n'), "explain text is unwrapped: {text}");
}

#[test]
fn crds_are_namespaced_with_status_names_and_columns() {
    let expect = [
        (
            "models.shoal.dev",
            "Model",
            "mdl",
            vec!["Version", "Phase", "Serving", "Artifact", "Age"],
        ),
        (
            "edgepools.shoal.dev",
            "EdgePool",
            "epool",
            vec!["Nodes", "Ready", "Stale", "Age"],
        ),
        (
            "modelrollouts.shoal.dev",
            "ModelRollout",
            "mro",
            vec!["Model", "Version", "Phase", "Step", "Weight", "Age"],
        ),
    ];
    for (crd, (name, kind, short, columns)) in crds().iter().zip(expect) {
        assert_eq!(crd.metadata.name.as_deref(), Some(name));
        assert_eq!(crd.spec.group, "shoal.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.names.short_names, Some(vec![short.to_owned()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["shoal".to_owned()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let got: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(got, columns, "{name} printer columns");
    }
    let model = Model::crd();
    let artifact = model.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .find(|c| c.name == "Artifact")
        .expect("Artifact column");
    assert_eq!(artifact.priority, Some(1), "the digest is for -o wide only");
}

#[test]
fn conditions_are_list_maps_keyed_by_type() {
    for schema in [
        schema_of::<Model>(),
        schema_of::<EdgePool>(),
        schema_of::<ModelRollout>(),
    ] {
        let conditions = at(&schema, "status.conditions");
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
        assert!(
            conditions["items"]["required"]
                .as_array()
                .is_some_and(|r| r.contains(&json!("type")))
        );
    }
}

#[test]
fn enums_list_exactly_the_known_values() {
    let model = schema_of::<Model>();
    assert_eq!(
        at(&model, "spec.compression.mode")["enum"],
        json!(["none", "fp16", "int8"])
    );
    assert_eq!(
        at(&model, "status.phase")["enum"],
        json!([
            "Pending",
            "Fetching",
            "Compressing",
            "Validating",
            "Ready",
            "Failed"
        ])
    );
    let rollout = schema_of::<ModelRollout>();
    assert_eq!(
        at(&rollout, "status.phase")["enum"],
        json!([
            "Progressing",
            "Paused",
            "Succeeded",
            "Degraded",
            "RolledBack",
            "Aborted"
        ])
    );
    let pool = schema_of::<EdgePool>();
    assert_eq!(
        at(&pool, "spec.agent.imagePullPolicy")["enum"],
        json!(["Always", "IfNotPresent", "Never"])
    );
}

#[test]
fn optional_enum_fields_keep_their_own_docs() {
    let model = schema_of::<Model>();
    let phase = at(&model, "status.phase")["description"]
        .as_str()
        .unwrap_or_default();
    assert!(phase.contains("Pending, Fetching"), "{phase}");
}

#[test]
fn defaults_are_in_the_schema() {
    let model = schema_of::<Model>();
    assert_eq!(at(&model, "spec.revisionHistoryLimit")["default"], 10);
    assert_eq!(at(&model, "spec.compression.mode")["default"], "none");
    assert_eq!(
        at(&model, "spec.compression.validation.samples")["default"],
        32
    );
    let pool = schema_of::<EdgePool>();
    assert_eq!(at(&pool, "spec.agent")["default"], json!({}));
    assert_eq!(at(&pool, "spec.agent.port")["default"], 8000);
    assert_eq!(at(&pool, "spec.agent.cacheSize")["default"], "2Gi");
    assert_eq!(
        at(&pool, "spec.agent.cacheSize")["x-kubernetes-int-or-string"],
        true
    );
    assert!(at(&pool, "spec.agent.image").get("default").is_none());
    assert!(
        at(&pool, "spec.agent.hostPort").get("default").is_none(),
        "no port is bound on the nodes unless asked for"
    );
    let rollout = schema_of::<ModelRollout>();
    assert_eq!(at(&rollout, "spec.maxUnavailable")["default"], "25%");
    assert_eq!(
        at(&rollout, "spec.maxUnavailable")["x-kubernetes-int-or-string"],
        true
    );
    assert_eq!(at(&rollout, "spec.autoRollback")["default"], true);
    assert_eq!(at(&rollout, "spec.paused")["default"], false);
    assert_eq!(at(&rollout, "spec.analysis.interval")["default"], "30s");
    assert_eq!(at(&rollout, "spec.analysis.minRequests")["default"], 50);
}

#[test]
fn required_fields_are_required() {
    let required = |schema: &Value, path: &str| -> Value {
        let s = if path.is_empty() {
            schema
        } else {
            at(schema, path)
        };
        s["required"].clone()
    };
    let model = schema_of::<Model>();
    assert_eq!(required(&model, "spec"), json!(["source", "version"]));
    assert_eq!(
        required(&model, "spec.source.http"),
        json!(["sha256", "url"])
    );
    assert_eq!(
        required(&model, "spec.source.configMap"),
        json!(["key", "name"])
    );
    let pool = schema_of::<EdgePool>();
    assert_eq!(required(&pool, "spec"), json!(["nodeSelector"]));
    let rollout = schema_of::<ModelRollout>();
    assert_eq!(
        required(&rollout, "spec"),
        json!(["model", "pools", "version"])
    );
    assert_eq!(required(&rollout, ""), json!(["spec"]));
}

#[test]
fn bounds_are_in_the_schema() {
    let model = schema_of::<Model>();
    let version = at(&model, "spec.version");
    assert_eq!(
        (version["minLength"].clone(), version["maxLength"].clone()),
        (json!(1), json!(63))
    );
    let limit = at(&model, "spec.revisionHistoryLimit");
    assert_eq!(
        (limit["minimum"].as_f64(), limit["maximum"].as_f64()),
        (Some(1.0), Some(100.0))
    );
    let samples = at(&model, "spec.compression.validation.samples");
    assert_eq!(
        (samples["minimum"].as_f64(), samples["maximum"].as_f64()),
        (Some(1.0), Some(10000.0))
    );
    let agreement = at(&model, "spec.compression.validation.minTop1Agreement");
    assert_eq!(
        (agreement["minimum"].as_f64(), agreement["maximum"].as_f64()),
        (Some(0.0), Some(1.0))
    );
    let pool = schema_of::<EdgePool>();
    let port = at(&pool, "spec.agent.port");
    assert_eq!(
        (port["minimum"].as_f64(), port["maximum"].as_f64()),
        (Some(1.0), Some(65535.0))
    );
    let host_port = at(&pool, "spec.agent.hostPort");
    assert_eq!(host_port["type"], "integer");
    assert_eq!(
        (host_port["minimum"].as_f64(), host_port["maximum"].as_f64()),
        (Some(1.0), Some(65535.0))
    );
    let rollout = schema_of::<ModelRollout>();
    let pools = at(&rollout, "spec.pools");
    assert_eq!(
        (pools["minItems"].clone(), pools["maxItems"].clone()),
        (json!(1), json!(50))
    );
    assert_eq!(pools["x-kubernetes-list-type"], "set");
    assert_eq!(at(&rollout, "spec.steps")["maxItems"], 50);
    assert_eq!(
        at(&rollout, "spec.analysis.maxP99Regression")["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        at(&rollout, "spec.analysis.maxErrorRate")["maximum"].as_f64(),
        Some(1.0)
    );
}

#[test]
fn cel_rules_sit_where_expected() {
    let model = schema_of::<Model>();
    let source = rules(at(&model, "spec.source"));
    assert_eq!(source.len(), 1);
    assert_eq!(
        source[0].1,
        "spec.source must set exactly one of http, configMap or oci"
    );

    let pool = schema_of::<EdgePool>();
    assert_eq!(
        rules(at(&pool, "spec.nodeSelector"))[0].1,
        "spec.nodeSelector must select nodes with matchLabels or matchExpressions; an empty selector would match every node in the cluster"
    );

    let rollout = schema_of::<ModelRollout>();
    assert_eq!(
        rules(at(&rollout, "spec.steps")),
        [(
            "self.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted()",
            "spec.steps: setWeight must not decrease from one step to the next"
        )]
    );
    assert!(
        rules(at(&rollout, "spec.steps.items"))[0]
            .1
            .contains("exactly one of setWeight, pause or analysis")
    );
    assert!(
        rules(at(&rollout, "spec.steps.items.setWeight"))[0]
            .1
            .contains("percent")
    );
    // `analysis: {}` is a typed, empty object: accepted, and kept by pruning.
    assert_eq!(at(&rollout, "spec.steps.items.analysis")["type"], "object");
}

#[test]
fn every_cel_rule_compiles() {
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("json");
        let compiled = kube_cel::compile_schema(&schema["openAPIV3Schema"]);
        assert!(
            !compiled.has_errors(),
            "{name}: {:?}",
            compiled.compilation_errors()
        );
    }
}

// ---------------------------------------------------------------------------
// CEL rules on real manifests

/// The messages of the rules `object` breaks, as the API server would report them.
fn broken_rules<K: CustomResourceExt>(object: &Value) -> Vec<String> {
    let schema = schema_of::<K>();
    match kube_cel::Validator::new().validate(&schema, object, None) {
        Ok(()) => vec![],
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

/// `fixture` with `value` at the slash-separated `pointer` (created when missing).
fn with(fixture: &str, pointer: &str, value: Value) -> Value {
    let mut object = yaml(fixture);
    *pointer_mut_or_insert(&mut object, pointer) = value;
    object
}

fn pointer_mut_or_insert<'a>(mut v: &'a mut Value, pointer: &str) -> &'a mut Value {
    for part in pointer.trim_start_matches('/').split('/') {
        v = match v {
            Value::Array(items) => &mut items[part.parse::<usize>().expect("index")],
            other => &mut other[part],
        };
    }
    v
}

fn without(fixture: &str, pointer: &str) -> Value {
    let mut object = yaml(fixture);
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    object
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent")
        .remove(key);
    object
}

#[track_caller]
fn assert_rejected<K: CustomResourceExt>(object: &Value, message: &str) {
    let broken = broken_rules::<K>(object);
    assert!(
        broken.iter().any(|b| b.contains(message)),
        "expected a failure mentioning {message:?}, got {broken:?}"
    );
}

#[test]
fn fixtures_pass_every_rule() {
    for (name, fixture) in [
        ("model-http", MODEL_HTTP),
        ("model-configmap", MODEL_CONFIGMAP),
        ("model-status", MODEL_STATUS),
    ] {
        assert_eq!(
            broken_rules::<Model>(&yaml(fixture)),
            Vec::<String>::new(),
            "{name}"
        );
    }
    assert_eq!(
        broken_rules::<EdgePool>(&yaml(EDGEPOOL)),
        Vec::<String>::new()
    );
    assert_eq!(
        broken_rules::<ModelRollout>(&yaml(MODELROLLOUT)),
        Vec::<String>::new()
    );
}

#[test]
fn model_source_must_be_exactly_one() {
    let two = with(
        MODEL_HTTP,
        "/spec/source/configMap",
        json!({"name": "ranker", "key": "model.onnx"}),
    );
    assert_rejected::<Model>(
        &two,
        "spec.source must set exactly one of http, configMap or oci",
    );
    let none = with(MODEL_HTTP, "/spec/source", json!({}));
    assert_rejected::<Model>(
        &none,
        "spec.source must set exactly one of http, configMap or oci",
    );
    let oci = with(
        MODEL_CONFIGMAP,
        "/spec/source",
        json!({"oci": {"reference": "r.example.com/m:1"}}),
    );
    assert_eq!(broken_rules::<Model>(&oci), Vec::<String>::new());
}

#[test]
fn model_fields_say_what_to_fix() {
    let upper = with(
        MODEL_HTTP,
        "/spec/source/http/sha256",
        json!("9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"),
    );
    assert_rejected::<Model>(&upper, "lowercase hex SHA-256");
    let ftp = with(
        MODEL_HTTP,
        "/spec/source/http/url",
        json!("ftp://models.example.com/m.onnx"),
    );
    assert_rejected::<Model>(&ftp, "url must start with http:// or https://");
    let version = with(MODEL_HTTP, "/spec/version", json!("-1.0 beta"));
    assert_rejected::<Model>(&version, "version must start with a letter or digit");
    let cm = with(
        MODEL_CONFIGMAP,
        "/spec/source/configMap/name",
        json!("Not_A_Name"),
    );
    assert_rejected::<Model>(&cm, "name must be a ConfigMap name");
    let key = with(
        MODEL_CONFIGMAP,
        "/spec/source/configMap/key",
        json!("model onnx"),
    );
    assert_rejected::<Model>(&key, "key must be a ConfigMap key");
}

#[test]
fn edge_pool_needs_a_non_empty_selector() {
    let message = "spec.nodeSelector must select nodes with matchLabels or matchExpressions";
    assert_rejected::<EdgePool>(&with(EDGEPOOL, "/spec/nodeSelector", json!({})), message);
    assert_rejected::<EdgePool>(
        &with(
            EDGEPOOL,
            "/spec/nodeSelector",
            json!({"matchLabels": {}, "matchExpressions": []}),
        ),
        message,
    );
    let labels_only = with(
        EDGEPOOL,
        "/spec/nodeSelector",
        json!({"matchLabels": {"a": "b"}}),
    );
    assert_eq!(broken_rules::<EdgePool>(&labels_only), Vec::<String>::new());
    let expressions_only = without(EDGEPOOL, "/spec/nodeSelector/matchLabels");
    assert_eq!(
        broken_rules::<EdgePool>(&expressions_only),
        Vec::<String>::new()
    );
}

#[test]
fn rollout_steps_are_checked() {
    let both = with(
        MODELROLLOUT,
        "/spec/steps/0",
        json!({"setWeight": 10, "pause": {}}),
    );
    assert_rejected::<ModelRollout>(
        &both,
        "each step must set exactly one of setWeight, pause or analysis",
    );
    let empty = with(MODELROLLOUT, "/spec/steps/0", json!({}));
    assert_rejected::<ModelRollout>(
        &empty,
        "each step must set exactly one of setWeight, pause or analysis",
    );
    let too_much = with(MODELROLLOUT, "/spec/steps/5", json!({"setWeight": 150}));
    assert_rejected::<ModelRollout>(&too_much, "setWeight is a percent of agents");
    let down = with(MODELROLLOUT, "/spec/steps/3", json!({"setWeight": 5}));
    assert_rejected::<ModelRollout>(
        &down,
        "spec.steps: setWeight must not decrease from one step to the next",
    );
    let equal = with(MODELROLLOUT, "/spec/steps/3", json!({"setWeight": 10}));
    assert_eq!(broken_rules::<ModelRollout>(&equal), Vec::<String>::new());
    let duration = with(
        MODELROLLOUT,
        "/spec/steps/1",
        json!({"pause": {"duration": "10 minutes"}}),
    );
    assert_rejected::<ModelRollout>(&duration, "pause.duration must be a duration");
    let long = with(
        MODELROLLOUT,
        "/spec/steps/1",
        json!({"pause": {"duration": "1h30m"}}),
    );
    assert_eq!(broken_rules::<ModelRollout>(&long), Vec::<String>::new());
    let no_steps = without(MODELROLLOUT, "/spec/steps");
    assert_eq!(
        broken_rules::<ModelRollout>(&no_steps),
        Vec::<String>::new()
    );
}

#[test]
fn rollout_fields_say_what_to_fix() {
    for bad in [json!("150%"), json!(-1), json!("ten"), json!("5 %")] {
        let object = with(MODELROLLOUT, "/spec/maxUnavailable", bad.clone());
        assert_rejected::<ModelRollout>(&object, "maxUnavailable must be a number of agents");
    }
    for good in [json!("0%"), json!("100%"), json!(0), json!(3)] {
        let object = with(MODELROLLOUT, "/spec/maxUnavailable", good.clone());
        assert_eq!(
            broken_rules::<ModelRollout>(&object),
            Vec::<String>::new(),
            "{good}"
        );
    }
    let pools = with(MODELROLLOUT, "/spec/pools", json!(["store-eu", "Store_US"]));
    assert_rejected::<ModelRollout>(&pools, "spec.pools must hold EdgePool names");
    let interval = with(MODELROLLOUT, "/spec/analysis/interval", json!("often"));
    assert_rejected::<ModelRollout>(&interval, "analysis.interval must be a duration");
    let model = with(MODELROLLOUT, "/spec/model", json!("Ranker"));
    assert_rejected::<ModelRollout>(&model, "model must be the name of a Model");
    let version = with(MODELROLLOUT, "/spec/version", json!("1.4.0+build/7"));
    assert_rejected::<ModelRollout>(&version, "version must start with a letter or digit");
}

#[test]
fn rollout_model_cannot_change() {
    let schema = schema_of::<ModelRollout>();
    let old = yaml(MODELROLLOUT);
    let new = with(MODELROLLOUT, "/spec/model", json!("other-model"));
    let errors = kube_cel::Validator::new()
        .validate(&schema, &new, Some(&old))
        .expect_err("model changed");
    assert!(
        errors
            .as_slice()
            .iter()
            .any(|e| e.message.contains("spec.model cannot change")),
        "{errors:?}"
    );
    let retarget = with(MODELROLLOUT, "/spec/version", json!("1.5.0"));
    assert!(
        kube_cel::Validator::new()
            .validate(&schema, &retarget, Some(&old))
            .is_ok()
    );
}

// ---------------------------------------------------------------------------
// Manifests through the Rust types

/// Every value in `expected` is in `actual` at the same place (numbers compared as
/// floats), so no field of a manifest is lost or renamed by the types.
fn assert_contains(actual: &Value, expected: &Value, path: &str) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, v) in e {
                let got = a.get(k).unwrap_or_else(|| panic!("{path}.{k} was dropped"));
                assert_contains(got, v, &format!("{path}.{k}"));
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            assert_eq!(e.len(), a.len(), "{path}: length");
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                assert_contains(av, ev, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(e), Value::Number(a)) => assert_eq!(e.as_f64(), a.as_f64(), "{path}"),
        (e, a) => assert_eq!(a, e, "{path}"),
    }
}

fn round_trip<K>(fixture: &str) -> K
where
    K: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let original = yaml(fixture);
    let typed: K = serde_json::from_value(original.clone()).expect("fixture fits the types");
    let written = serde_json::to_value(&typed).expect("serializes");
    assert_contains(&written, &original, "");
    let again: K = serde_json::from_value(written).expect("reads back");
    assert_eq!(again, typed);
    typed
}

#[test]
fn manifests_round_trip() {
    let model: Model = round_trip(MODEL_HTTP);
    assert_eq!(
        model.spec.compression.as_ref().map(|c| c.mode),
        Some(CompressionMode::Int8)
    );
    let small: Model = round_trip(MODEL_CONFIGMAP);
    assert_eq!(
        small.spec.revision_history_limit,
        Some(10),
        "default applied"
    );
    assert_eq!(small.spec.compression, None);
    let status: Model = round_trip(MODEL_STATUS);
    let status = status.status.expect("status");
    assert_eq!(status.phase, Some(ModelPhase::Ready));
    assert_eq!(status.versions[0].inputs[0].shape, [-1, 64]);
    let pool: EdgePool = round_trip(EDGEPOOL);
    assert_eq!(pool.spec.agent.port_or_default(), 9000);
    assert_eq!(pool.spec.agent.host_port, Some(9000));
    assert_eq!(
        pool.status.as_ref().and_then(|s| s.service_name.as_deref()),
        Some("shoal-agent-store-eu")
    );
    assert_eq!(pool.status.map(|s| s.agents_ready), Some(118));
    let rollout: ModelRollout = round_trip(MODELROLLOUT);
    assert_eq!(rollout.spec.steps.len(), 6);
    assert_eq!(rollout.spec.steps[2].analysis, Some(AnalysisStep {}));
    assert_eq!(
        rollout.status.and_then(|s| s.phase),
        Some(RolloutPhase::Progressing)
    );
}

#[test]
fn analysis_step_is_written_as_an_empty_object() {
    let step = RolloutStep {
        analysis: Some(AnalysisStep {}),
        ..RolloutStep::default()
    };
    assert_eq!(
        serde_json::to_value(&step).expect("json"),
        json!({"analysis": {}})
    );
}

#[test]
fn omitted_fields_take_their_defaults() {
    let rollout: ModelRollout = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "r"},
        "spec": {"model": "m", "version": "1", "pools": ["p"]}
    }))
    .expect("minimal rollout");
    assert!(rollout.spec.auto_rollback);
    assert!(!rollout.spec.paused);
    assert!(rollout.spec.steps.is_empty());
    assert_eq!(
        rollout.spec.max_unavailable_or_default(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("25%".into())
    );

    let agent: AgentSettings = serde_json::from_value(json!({})).expect("empty agent");
    assert_eq!(agent.port, Some(8000));
    assert_eq!(agent.host_port, None);
    assert_eq!(agent.cache_size_or_default().0, "2Gi");
    assert_eq!(AgentSettings::default().port_or_default(), 8000);
    assert_eq!(AgentSettings::default().cache_size_or_default().0, "2Gi");
    assert_eq!(
        AgentSettings::default().image_or_default(),
        format!(
            "ghcr.io/shoal-dev/shoal-agent:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn values_from_a_newer_operator_still_read() {
    let phase: ModelPhase = serde_json::from_value(json!("Quarantined")).expect("unknown phase");
    assert_eq!(phase, ModelPhase::Unknown);
    let phase: RolloutPhase = serde_json::from_value(json!("Rewinding")).expect("unknown phase");
    assert_eq!(phase, RolloutPhase::Unknown);
    let mode: CompressionMode = serde_json::from_value(json!("int4")).expect("unknown mode");
    assert_eq!(mode, CompressionMode::Unknown);
    assert_eq!(
        serde_json::to_value(CompressionMode::Fp16).expect("json"),
        json!("fp16")
    );
    assert_eq!(
        serde_json::to_value(ModelPhase::Ready).expect("json"),
        json!("Ready")
    );
}
