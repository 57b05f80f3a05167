//! Compression in the Model controller against the real API server: `spec.compression`
//! publishes the compressed artifact with its lineage and gate figures in status; a gate
//! that cannot hold fails the new version and leaves the previous one published; real
//! inputs come from a ConfigMap dataset; identical compressions run once; a model with
//! nothing to quantize passes through unchanged.

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use shoal_api::{CompressionMode, Model, ModelVersion};
use shoal_tests::cluster::{TestNamespace, client, install_crds};
use shoal_tests::file_server::serve_file;
use shoal_tests::model_objects::{
    create_model, ready_condition, wait_model_failed, wait_model_ready,
};
use shoal_tests::onnx_models::tiny_onnx_model;
use shoal_tests::operator_process::Operator;
use shoal_tests::test_models::{magika_onnx, recommender_dir, sha256_hex};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

struct Setup {
    namespace: TestNamespace,
    operator: Operator,
    client: Client,
}

impl Setup {
    async fn start(prefix: &str) -> anyhow::Result<Setup> {
        let client: Client = client().await?;
        install_crds(&client).await?;
        let namespace = TestNamespace::create(&client, prefix).await?;
        let operator = Operator::start(namespace.name()).await?;
        Ok(Setup {
            namespace,
            operator,
            client,
        })
    }

    fn models(&self) -> Api<Model> {
        Api::namespaced(self.client.clone(), self.namespace.name())
    }

    async fn create_model(&self, name: &str, spec: serde_json::Value) -> anyhow::Result<()> {
        create_model(&self.models(), name, spec).await?;
        Ok(())
    }

    async fn wait_ready(&self, name: &str, version: &str) -> anyhow::Result<Model> {
        wait_model_ready(&self.models(), name, version, WAIT).await
    }

    async fn wait_failed(&self, name: &str, reason: &str) -> anyhow::Result<(Model, Condition)> {
        wait_model_failed(&self.models(), name, reason, WAIT).await
    }

    fn compression_records(&self) -> anyhow::Result<usize> {
        let dir = self.operator.artifact_dir().join("compressions");
        Ok(std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
            })
            .count())
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.operator.stop().await?;
        self.namespace.delete().await
    }
}

fn latest_entry(model: &Model) -> anyhow::Result<&ModelVersion> {
    let status = model.status.as_ref().context("status")?;
    let latest = status.latest_version.as_deref().context("latestVersion")?;
    status
        .versions
        .iter()
        .find(|v| v.version == latest)
        .context("the latest version's entry")
}

fn artifact_file(artifact_dir: &Path, digest: &str) -> std::path::PathBuf {
    artifact_dir
        .join("sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[tokio::test]
async fn int8_publishes_the_compressed_artifact_and_a_failing_gate_keeps_the_previous_version()
-> anyhow::Result<()> {
    let setup = Setup::start("compress-gate").await?;
    let onnx = magika_onnx()?;
    let (url, server) = serve_file(onnx.clone()).await?;
    let source = json!({ "http": { "url": url, "sha256": sha256_hex(&onnx) } });
    setup
        .create_model(
            "magika",
            json!({
                "version": "1.0",
                "source": source,
                "compression": {
                    "mode": "int8",
                    "validation": { "samples": 8, "maxAbsError": 0.01, "minTop1Agreement": 0.99 },
                },
            }),
        )
        .await?;

    let model = setup.wait_ready("magika", "1.0").await?;
    let entry = latest_entry(&model)?.clone();
    ensure!(entry.compression == CompressionMode::Int8, "{entry:?}");
    ensure!(
        entry.source_digest == format!("sha256:{}", sha256_hex(&onnx)),
        "lineage names the source: {entry:?}"
    );
    ensure!(entry.artifact_digest != entry.source_digest, "{entry:?}");
    ensure!(entry.source_bytes == onnx.len() as u64, "{entry:?}");
    ensure!(
        entry.compression_ratio >= 3.5 && entry.artifact_bytes * 7 <= entry.source_bytes * 2,
        "int8 should make magika at least 3.5x smaller: {entry:?}"
    );
    let figures = entry.validation.clone().context("validation figures")?;
    ensure!(figures.samples == 8, "{figures:?}");
    ensure!(figures.max_abs_error <= 0.01, "{figures:?}");
    ensure!(figures.top1_agreement == Some(1.0), "{figures:?}");
    // Agents download the artifact: it is in the store and is the compressed model.
    let artifact = std::fs::read(artifact_file(
        &setup.operator.artifact_dir(),
        &entry.artifact_digest,
    ))?;
    ensure!(artifact.len() as u64 == entry.artifact_bytes);
    ensure!(format!("sha256:{}", sha256_hex(&artifact)) == entry.artifact_digest);
    let message = ready_condition(&model).context("Ready")?.message.clone();
    ensure!(
        message.contains("int8"),
        "Ready message tells the lineage: {message}"
    );

    // Version 2.0 of the same bytes with a gate no int8 model can meet.
    let patch = json!({ "spec": {
        "version": "2.0",
        "compression": { "mode": "int8", "validation": { "samples": 8, "maxAbsError": 0.0 } },
    }});
    setup
        .models()
        .patch("magika", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let (model, condition) = setup.wait_failed("magika", "ValidationFailed").await?;
    ensure!(
        condition.message.contains("maxAbsError 0")
            && condition.message.contains("max abs error")
            && condition.message.contains("previous version keeps serving"),
        "the message gives the figures and what happens: {}",
        condition.message
    );
    let status = model.status.as_ref().context("status")?;
    ensure!(
        status.latest_version.as_deref() == Some("1.0"),
        "{status:?}"
    );
    ensure!(
        status.artifact_digest.as_deref() == Some(entry.artifact_digest.as_str()),
        "the published artifact is unchanged: {status:?}"
    );
    ensure!(status.versions.len() == 1, "{status:?}");

    server.abort();
    setup.finish().await
}

#[tokio::test]
async fn dataset_from_a_config_map_and_identical_compressions_run_once() -> anyhow::Result<()> {
    let setup = Setup::start("compress-dataset").await?;
    let dir = recommender_dir()?;
    let onnx = std::fs::read(dir.join("recommender.onnx"))?;
    let dataset = std::fs::read_to_string(dir.join("validation.jsonl"))?;
    let config_maps: Api<ConfigMap> = Api::namespaced(setup.client.clone(), setup.namespace.name());
    let config_map = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("recommender-validation".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("validation.jsonl".to_string(), dataset)])),
        ..Default::default()
    };
    config_maps
        .create(&PostParams::default(), &config_map)
        .await?;
    let (url, server) = serve_file(onnx.clone()).await?;
    let spec = json!({
        "version": "1.0",
        "source": { "http": { "url": url, "sha256": sha256_hex(&onnx) } },
        "compression": {
            "mode": "int8",
            "perChannel": true,
            "validation": {
                "samples": 64,
                "dataset": { "name": "recommender-validation", "key": "validation.jsonl" },
                "minTop1Agreement": 0.95,
            },
        },
    });
    setup.create_model("first", spec.clone()).await?;
    let first = setup.wait_ready("first", "1.0").await?;
    let entry = latest_entry(&first)?.clone();
    let figures = entry.validation.clone().context("validation figures")?;
    ensure!(
        figures.samples == 64,
        "all 64 dataset lines were used: {figures:?}"
    );
    ensure!(
        figures.top1_agreement.is_some_and(|a| a >= 0.95),
        "{figures:?}"
    );
    ensure!(entry.compression_ratio >= 3.5, "{entry:?}");
    ensure!(setup.compression_records()? == 1);

    // The same source, options and dataset: the recorded result is reused.
    setup.create_model("second", spec).await?;
    let second = setup.wait_ready("second", "1.0").await?;
    let again = latest_entry(&second)?;
    ensure!(again.artifact_digest == entry.artifact_digest, "{again:?}");
    ensure!(again.validation == entry.validation, "{again:?}");
    ensure!(
        setup.compression_records()? == 1,
        "no second compression ran"
    );

    // A dataset that does not fit the model fails the version with the line to fix.
    config_maps
        .patch(
            "recommender-validation",
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": { "validation.jsonl": "{\"inputs\":[]}\n" } })),
        )
        .await?;
    let patch = json!({ "spec": { "version": "2.0" } });
    setup
        .models()
        .patch("first", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let (model, condition) = setup
        .wait_failed("first", "InvalidValidationDataset")
        .await?;
    ensure!(
        condition.message.contains("line 1") && condition.message.contains("user_id"),
        "{}",
        condition.message
    );
    ensure!(
        model
            .status
            .as_ref()
            .and_then(|s| s.latest_version.as_deref())
            == Some("1.0"),
        "1.0 stays published"
    );

    server.abort();
    setup.finish().await
}

#[tokio::test]
async fn a_model_without_quantizable_weights_passes_through_unchanged() -> anyhow::Result<()> {
    let setup = Setup::start("compress-none").await?;
    // The tiny scorer's only weight has 12 elements: too small to quantize.
    let onnx = tiny_onnx_model();
    let (url, server) = serve_file(onnx.clone()).await?;
    setup
        .create_model(
            "tiny",
            json!({
                "version": "1.0",
                "source": { "http": { "url": url, "sha256": sha256_hex(&onnx) } },
                "compression": { "mode": "int8", "validation": { "maxAbsError": 0.0 } },
            }),
        )
        .await?;
    let model = setup.wait_ready("tiny", "1.0").await?;
    let entry = latest_entry(&model)?;
    ensure!(entry.compression_ratio == 1.0, "{entry:?}");
    ensure!(
        entry.artifact_digest == entry.source_digest,
        "byte for byte: {entry:?}"
    );
    let figures = entry.validation.as_ref().context("figures")?;
    ensure!(figures.max_abs_error == 0.0, "{figures:?}");
    server.abort();
    setup.finish().await
}
