//! Shoal's objects in a test's namespace: a ConfigMap of ONNX files, Models,
//! EdgePools and ModelRollouts. Creating them, changing them and waiting on them.

use crate::kwok_nodes::KWOK_NODE_KEY;
use crate::wait::wait_for;
use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shoal_api::{EdgePool, Model, ModelPhase, ModelRollout};
use std::time::Duration;

/// Creates ConfigMap `name` whose binary data holds `files`: (key, bytes) pairs.
pub async fn create_config_map(
    api: &Api<ConfigMap>,
    name: &str,
    files: &[(&str, &[u8])],
) -> anyhow::Result<()> {
    let config_map = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        binary_data: Some(
            files
                .iter()
                .map(|(key, bytes)| (key.to_string(), ByteString(bytes.to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    api.create(&PostParams::default(), &config_map)
        .await
        .with_context(|| format!("cannot create ConfigMap {name}"))?;
    Ok(())
}

/// Creates Model `name` with `spec`, written as in a manifest.
pub async fn create_model(api: &Api<Model>, name: &str, spec: Value) -> anyhow::Result<Model> {
    let model: Model = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Model",
        "metadata": { "name": name },
        "spec": spec,
    }))?;
    Ok(api.create(&PostParams::default(), &model).await?)
}

/// Creates EdgePool `name` for the nodes `node_selector` (a label selector, written
/// as in a manifest) selects; its agent pods tolerate the kwok nodes' taint.
pub async fn create_edge_pool(
    api: &Api<EdgePool>,
    name: &str,
    node_selector: Value,
) -> anyhow::Result<()> {
    let pool: EdgePool = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1", "kind": "EdgePool",
        "metadata": { "name": name },
        "spec": {
            "nodeSelector": node_selector,
            "tolerations": [{ "key": KWOK_NODE_KEY, "operator": "Exists", "effect": "NoSchedule" }],
        },
    }))?;
    api.create(&PostParams::default(), &pool).await?;
    Ok(())
}

/// Creates ModelRollout `name` with `spec`, written as in a manifest.
pub async fn create_rollout(
    api: &Api<ModelRollout>,
    name: &str,
    spec: Value,
) -> anyhow::Result<()> {
    let rollout: ModelRollout = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1", "kind": "ModelRollout",
        "metadata": { "name": name },
        "spec": spec,
    }))?;
    api.create(&PostParams::default(), &rollout).await?;
    Ok(())
}

/// Merges `spec` into the spec of ModelRollout `name`, e.g. `json!({ "version": "2.0" })`.
pub async fn patch_rollout(api: &Api<ModelRollout>, name: &str, spec: Value) -> anyhow::Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "spec": spec })),
    )
    .await?;
    Ok(())
}

/// Waits until `version` of Model `name` is among its Ready versions
/// (`status.versions`), whatever version the Model's spec names now.
pub async fn wait_model_version(
    api: &Api<Model>,
    name: &str,
    version: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for(api, name, timeout, |model| {
        model
            .status
            .as_ref()
            .is_some_and(|s| s.versions.iter().any(|v| v.version == version))
    })
    .await
    .with_context(|| format!("Model {name} version {version} should become Ready"))?;
    Ok(())
}

/// Sets Model `name` to `version` from key `key` of ConfigMap `config_map` and waits
/// until that version is Ready.
pub async fn make_version_ready(
    api: &Api<Model>,
    name: &str,
    config_map: &str,
    version: &str,
    key: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let patch = json!({ "spec": { "version": version, "source": { "configMap": { "name": config_map, "key": key } } } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_model_version(api, name, version, timeout).await
}

/// Waits until Model `name` is in phase Ready with `version` as its latest version.
pub async fn wait_model_ready(
    api: &Api<Model>,
    name: &str,
    version: &str,
    timeout: Duration,
) -> anyhow::Result<Model> {
    wait_for(api, name, timeout, |model| {
        model.status.as_ref().is_some_and(|status| {
            status.phase == Some(ModelPhase::Ready)
                && status.latest_version.as_deref() == Some(version)
        })
    })
    .await
}

/// Waits until Model `name` is in phase Failed with a Ready condition of `reason`;
/// returns the Model and that condition.
pub async fn wait_model_failed(
    api: &Api<Model>,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> anyhow::Result<(Model, Condition)> {
    let model = wait_for(api, name, timeout, |model| {
        model
            .status
            .as_ref()
            .is_some_and(|status| status.phase == Some(ModelPhase::Failed))
            && ready_condition(model).is_some_and(|c| c.reason == reason)
    })
    .await?;
    let condition = ready_condition(&model)
        .cloned()
        .context("the Ready condition")?;
    Ok((model, condition))
}

/// The Model's Ready condition, if it has one.
pub fn ready_condition(model: &Model) -> Option<&Condition> {
    model
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
}
