//! The CRDs' schema and CEL rules, checked by the real API server: each invalid
//! object is refused with a message that says what to fix, and one valid object of
//! each kind is accepted (with its defaults filled in).

use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::{Api, Client};
use shoal_api::{EdgePool, Model, ModelRollout};
use shoal_tests::{TestNamespace, client, install_crds};

/// Objects in these tests are written as the YAML a person would `kubectl apply`.
/// They go through `DynamicObject` because the typed structs cannot express most
/// of the invalid ones.
fn manifest(yaml: &str) -> DynamicObject {
    serde_yaml::from_str(yaml).expect("the test's manifest is valid YAML")
}

/// Creates `yaml` and returns the API server's error message; fails if the object
/// was accepted.
async fn rejection(api: &Api<DynamicObject>, yaml: &str) -> String {
    let object = manifest(yaml);
    match api.create(&PostParams::default(), &object).await {
        Ok(accepted) => panic!(
            "the API server accepted an invalid object:\n{yaml}\nit stored:\n{}",
            serde_yaml::to_string(&accepted).unwrap_or_default()
        ),
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                status.code, 422,
                "expected 422 Invalid, got {status:?} for:\n{yaml}"
            );
            status.message
        }
        Err(other) => {
            panic!("creating the object failed with something other than a rejection: {other}")
        }
    }
}

async fn assert_rejected(api: &Api<DynamicObject>, yaml: &str, expected: &str) {
    let message = rejection(api, yaml).await;
    assert!(
        message.contains(expected),
        "the API server's message does not say {expected:?}.\nIt said: {message}\nfor:\n{yaml}"
    );
}

async fn accepted(api: &Api<DynamicObject>, yaml: &str) -> DynamicObject {
    match api.create(&PostParams::default(), &manifest(yaml)).await {
        Ok(object) => object,
        Err(err) => panic!("the API server refused a valid object: {err}\n{yaml}"),
    }
}

async fn setup(prefix: &str) -> anyhow::Result<(Client, TestNamespace)> {
    let client = client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, prefix).await?;
    Ok((client, namespace))
}

fn dynamic_api<K: kube::Resource<DynamicType = ()>>(
    client: &Client,
    namespace: &str,
) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &ApiResource::erase::<K>(&()))
}

#[tokio::test]
async fn model_rules() -> anyhow::Result<()> {
    let (client, namespace) = setup("crd-model").await?;
    let models = dynamic_api::<Model>(&client, namespace.name());

    assert_rejected(
        &models,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: two-sources}
spec:
  version: "1.0"
  source:
    http: {url: "https://models.example.com/ranker.onnx", sha256: "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"}
    configMap: {name: ranker, key: model.onnx}
"#,
        "spec.source must set exactly one of http, configMap or oci",
    )
    .await;

    assert_rejected(
        &models,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: empty-source}
spec:
  version: "1.0"
  source: {}
"#,
        "spec.source must set exactly one of http, configMap or oci",
    )
    .await;

    assert_rejected(
        &models,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: no-source}
spec:
  version: "1.0"
"#,
        "spec.source: Required value",
    )
    .await;

    assert_rejected(
        &models,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: http-without-sha256}
spec:
  version: "1.0"
  source:
    http: {url: "https://models.example.com/ranker.onnx"}
"#,
        "spec.source.http.sha256: Required value",
    )
    .await;

    assert_rejected(
        &models,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: non-hex-sha256}
spec:
  version: "1.0"
  source:
    http: {url: "https://models.example.com/ranker.onnx", sha256: "zz2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"}
"#,
        "sha256 must be the lowercase hex SHA-256 of the file",
    )
    .await;

    let message = rejection(
        &models,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: int4}
spec:
  version: "1.0"
  source:
    configMap: {name: ranker, key: model.onnx}
  compression: {mode: int4}
"#,
    )
    .await;
    assert!(
        message.contains(r#"spec.compression.mode: Unsupported value: "int4""#)
            && message.contains(r#""int8""#),
        "the message should name the bad mode and list the supported ones; it said: {message}"
    );

    let model = accepted(
        &models,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: ranker}
spec:
  version: "1.4.0"
  source:
    http: {url: "https://models.example.com/ranker.onnx", sha256: "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"}
  compression: {mode: fp16}
"#,
    )
    .await;
    assert_eq!(
        model.data["spec"]["revisionHistoryLimit"], 10,
        "the API server should default spec.revisionHistoryLimit to 10; it stored {}",
        model.data["spec"]
    );

    namespace.delete().await
}

#[tokio::test]
async fn model_rollout_rules() -> anyhow::Result<()> {
    let (client, namespace) = setup("crd-rollout").await?;
    let rollouts = dynamic_api::<ModelRollout>(&client, namespace.name());

    assert_rejected(
        &rollouts,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: ModelRollout
metadata: {name: decreasing}
spec:
  model: ranker
  version: "1.4.0"
  pools: [stores]
  steps:
  - setWeight: 50
  - setWeight: 20
"#,
        "spec.steps: setWeight must not decrease from one step to the next",
    )
    .await;

    assert_rejected(
        &rollouts,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: ModelRollout
metadata: {name: over-100}
spec:
  model: ranker
  version: "1.4.0"
  pools: [stores]
  steps:
  - setWeight: 150
"#,
        "setWeight is a percent of agents: use a whole number from 0 to 100",
    )
    .await;

    let rollout = accepted(
        &rollouts,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: ModelRollout
metadata: {name: ranker-1-4-0}
spec:
  model: ranker
  version: "1.4.0"
  pools: [stores-eu, stores-us]
  steps:
  - setWeight: 10
  - pause: {duration: 10m}
  - setWeight: 50
  - analysis: {}
  - pause: {}
  - setWeight: 100
  analysis:
    interval: 1m
    maxErrorRate: 0.01
    maxP99LatencyMs: 50
"#,
    )
    .await;
    assert_eq!(
        rollout.data["spec"]["autoRollback"], true,
        "the API server should default spec.autoRollback to true; it stored {}",
        rollout.data["spec"]
    );

    namespace.delete().await
}

#[tokio::test]
async fn edge_pool_rules() -> anyhow::Result<()> {
    let (client, namespace) = setup("crd-pool").await?;
    let pools = dynamic_api::<EdgePool>(&client, namespace.name());

    assert_rejected(
        &pools,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: EdgePool
metadata: {name: no-selector}
spec:
  tolerations: [{key: edge, operator: Exists, effect: NoSchedule}]
"#,
        "spec.nodeSelector: Required value",
    )
    .await;

    assert_rejected(
        &pools,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: EdgePool
metadata: {name: empty-selector}
spec:
  nodeSelector: {}
"#,
        "spec.nodeSelector must select nodes with matchLabels or matchExpressions",
    )
    .await;

    accepted(
        &pools,
        r#"
apiVersion: shoal.dev/v1alpha1
kind: EdgePool
metadata: {name: stores-eu}
spec:
  nodeSelector:
    matchLabels: {shoal.dev/site: store}
    matchExpressions:
    - {key: topology.kubernetes.io/region, operator: In, values: [eu-west, eu-north]}
  tolerations: [{key: edge, operator: Exists, effect: NoSchedule}]
  agent:
    port: 9000
    cacheSize: 512Mi
    env: [{name: RUST_LOG, value: debug}]
"#,
    )
    .await;

    namespace.delete().await
}
