//! The Model controller against the real API server: a version becomes Ready from a
//! ConfigMap (a tiny hand-written ONNX model) or an http URL (the real magika model)
//! and is stored by digest; a wrong digest, a rebound version and a non-ONNX file
//! fail with the reason a person needs. Compression has its own file, compression.rs.

use anyhow::{Context as _, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use shoal_api::{Model, TensorSpec};
use shoal_tests::cluster::{TestNamespace, client, install_crds};
use shoal_tests::file_server::{serve_file, serve_redirect};
use shoal_tests::model_objects::{
    create_config_map, create_model, ready_condition, wait_model_failed, wait_model_ready,
};
use shoal_tests::onnx_models::{string_input_onnx_model, tiny_onnx_model};
use shoal_tests::operator_process::Operator;
use shoal_tests::test_models::{magika_onnx, ppocr_cls_onnx, sha256_hex};
use shoal_tests::wait::wait_for;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// One test's namespace, operator and APIs.
struct Setup {
    namespace: TestNamespace,
    operator: Operator,
    models: Api<Model>,
    config_maps: Api<ConfigMap>,
}

impl Setup {
    async fn start(prefix: &str) -> anyhow::Result<Setup> {
        Self::start_with_args(prefix, &[]).await
    }

    /// [`Setup::start`] with more flags for the operator.
    async fn start_with_args(prefix: &str, args: &[&str]) -> anyhow::Result<Setup> {
        let client: Client = client().await?;
        install_crds(&client).await?;
        let namespace = TestNamespace::create(&client, prefix).await?;
        let operator = Operator::start_with_args(namespace.name(), args).await?;
        Ok(Setup {
            models: Api::namespaced(client.clone(), namespace.name()),
            config_maps: Api::namespaced(client, namespace.name()),
            namespace,
            operator,
        })
    }

    /// The test passed: stop the operator quietly and delete the namespace.
    async fn finish(self) -> anyhow::Result<()> {
        self.operator.stop().await?;
        self.namespace.delete().await
    }

    /// ConfigMap `config_map` with `bytes` under key `model.onnx`, and Model `model`
    /// at `version` from it.
    async fn create_model_from_config_map(
        &self,
        config_map: &str,
        version: &str,
        bytes: &[u8],
    ) -> anyhow::Result<()> {
        create_config_map(&self.config_maps, config_map, &[("model.onnx", bytes)]).await?;
        self.create_model(json!({
            "version": version,
            "source": { "configMap": { "name": config_map, "key": "model.onnx" } },
        }))
        .await?;
        Ok(())
    }

    async fn create_model(&self, spec: serde_json::Value) -> anyhow::Result<Model> {
        create_model(&self.models, "model", spec).await
    }

    async fn wait_ready(&self, version: &str) -> anyhow::Result<Model> {
        wait_model_ready(&self.models, "model", version, WAIT).await
    }

    /// Waits for phase Failed with a Ready condition of `reason`, which must be False;
    /// returns the model and that condition.
    async fn wait_failed(&self, reason: &str) -> anyhow::Result<(Model, Condition)> {
        let (model, condition) = wait_model_failed(&self.models, "model", reason, WAIT).await?;
        ensure!(
            condition.status == "False",
            "a Failed model's Ready condition is False: {condition:?}"
        );
        Ok((model, condition))
    }

    /// Digests of the blobs in the operator's artifact store.
    fn stored_artifacts(&self) -> anyhow::Result<Vec<String>> {
        let dir = self.operator.artifact_dir().join("sha256");
        let mut names = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }
}

/// How `status.versions[].sourceDigest`/`artifactDigest` and `status.artifactDigest`
/// write a digest: "sha256:<hex>", as their doc comments in the api crate say.
fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    }
}

/// Checks the Ready model's status against the bytes it was made from, and that
/// the operator stored exactly those bytes at `<artifact dir>/sha256/<hex>`.
fn assert_published(
    model: &Model,
    version: &str,
    bytes: &[u8],
    artifact_dir: &Path,
) -> anyhow::Result<()> {
    let status = model
        .status
        .as_ref()
        .context("a Ready model has a status")?;
    ensure!(
        status.observed_generation == model.metadata.generation,
        "status.observedGeneration {:?} != metadata.generation {:?}",
        status.observed_generation,
        model.metadata.generation
    );
    ensure!(
        status.artifact_digest.as_deref() == Some(digest(bytes).as_str()),
        "status.artifactDigest is {:?}, expected {}",
        status.artifact_digest,
        digest(bytes)
    );
    let entry = status
        .versions
        .iter()
        .find(|entry| entry.version == version)
        .with_context(|| {
            format!(
                "status.versions has no entry for {version}: {:?}",
                status.versions
            )
        })?;
    ensure!(
        entry.source_digest == digest(bytes),
        "sourceDigest is {}, expected {}",
        entry.source_digest,
        digest(bytes)
    );
    ensure!(
        entry.artifact_digest == digest(bytes),
        "artifactDigest is {}, expected {}",
        entry.artifact_digest,
        digest(bytes)
    );
    ensure!(
        entry.source_bytes == bytes.len() as u64,
        "sourceBytes is {}, the file has {}",
        entry.source_bytes,
        bytes.len()
    );
    ensure!(
        entry.artifact_bytes == bytes.len() as u64,
        "artifactBytes is {}, the file has {}",
        entry.artifact_bytes,
        bytes.len()
    );
    let ready = ready_condition(model).context("a Ready condition")?;
    ensure!(
        ready.status == "True" && ready.reason == "VersionReady",
        "the Ready condition is {ready:?}"
    );

    let path = artifact_dir.join("sha256").join(sha256_hex(bytes));
    let stored = std::fs::read(&path)
        .with_context(|| format!("the artifact {} should exist", path.display()))?;
    ensure!(
        stored == bytes,
        "{} does not hold the model's bytes",
        path.display()
    );
    Ok(())
}

#[tokio::test]
async fn model_from_a_config_map_becomes_ready() -> anyhow::Result<()> {
    let setup = Setup::start("model-configmap").await?;
    let onnx = tiny_onnx_model();
    setup
        .create_model_from_config_map("scorer", "1.0", &onnx)
        .await?;

    let model = setup.wait_ready("1.0").await?;
    assert_published(&model, "1.0", &onnx, &setup.operator.artifact_dir())?;
    let entry = &model.status.as_ref().context("status")?.versions[0];
    assert_eq!(entry.inputs, [tensor("tokens", "INT32", &[-1, 4])]);
    assert_eq!(entry.outputs, [tensor("scores", "FP32", &[-1, 3])]);

    setup.finish().await
}

/// A real model small enough for a ConfigMap: PP-OCR's text-direction classifier.
/// It declares its input as x float [-1, 3, ?, ?], height and width dynamic and
/// unnamed, as many real exports do; onnxruntime serves it, and so must Shoal.
#[tokio::test]
async fn real_model_with_unnamed_dynamic_dims_becomes_ready() -> anyhow::Result<()> {
    let setup = Setup::start("model-ppocr").await?;
    let onnx = ppocr_cls_onnx()?;
    setup
        .create_model_from_config_map("ppocr-cls", "2.0", &onnx)
        .await?;

    let model = setup.wait_ready("2.0").await?;
    assert_published(&model, "2.0", &onnx, &setup.operator.artifact_dir())?;
    let entry = &model.status.as_ref().context("status")?.versions[0];
    assert_eq!(entry.inputs, [tensor("x", "FP32", &[-1, 3, -1, -1])]);
    assert_eq!(
        entry.outputs,
        [tensor("save_infer_model/scale_0.tmp_1", "FP32", &[-1, 2])]
    );

    setup.finish().await
}

#[tokio::test]
async fn model_from_an_http_url_becomes_ready() -> anyhow::Result<()> {
    let setup = Setup::start("model-http").await?;
    let onnx = magika_onnx()?;
    let (url, server) = serve_file(onnx.clone()).await?;
    setup
        .create_model(json!({
            "version": "1.0.3",
            "source": { "http": { "url": url, "sha256": sha256_hex(&onnx) } },
        }))
        .await?;

    let model = setup.wait_ready("1.0.3").await?;
    assert_published(&model, "1.0.3", &onnx, &setup.operator.artifact_dir())?;
    let entry = &model.status.as_ref().context("status")?.versions[0];
    // magika's graph declares bytes int32 [unk__214, 2048] -> target_label float [unk__215, 214].
    assert_eq!(entry.inputs, [tensor("bytes", "INT32", &[-1, 2048])]);
    assert_eq!(entry.outputs, [tensor("target_label", "FP32", &[-1, 214])]);

    server.abort();
    setup.finish().await
}

#[tokio::test]
async fn wrong_sha256_fails_with_digest_mismatch_and_stores_nothing() -> anyhow::Result<()> {
    let setup = Setup::start("model-digest").await?;
    let onnx = tiny_onnx_model();
    let (url, server) = serve_file(onnx.clone()).await?;
    let declared = sha256_hex(b"some other file");
    setup
        .create_model(json!({
            "version": "1.0",
            "source": { "http": { "url": url, "sha256": declared } },
        }))
        .await?;

    let (model, condition) = setup.wait_failed("DigestMismatch").await?;
    ensure!(
        condition.message.contains(&declared) && !condition.message.contains(&sha256_hex(&onnx)),
        "the message shows the declared digest, never the fetched one: {}",
        condition.message
    );
    let status = model.status.as_ref().context("status")?;
    ensure!(
        status.latest_version.is_none(),
        "no version may be Ready: {status:?}"
    );
    ensure!(
        status.versions.is_empty(),
        "no version may be recorded: {status:?}"
    );
    let stored = setup.stored_artifacts()?;
    ensure!(
        stored.is_empty(),
        "the artifact store must stay empty after a digest mismatch; it holds {stored:?}"
    );

    server.abort();
    setup.finish().await
}

#[tokio::test]
async fn same_version_with_other_bytes_is_a_version_conflict() -> anyhow::Result<()> {
    let setup = Setup::start("model-conflict").await?;
    let original = tiny_onnx_model();
    setup
        .create_model_from_config_map("scorer", "1.0", &original)
        .await?;
    setup.wait_ready("1.0").await?;

    // A "retrained" model: the same graph with a new ModelProto.doc_string (field 6,
    // appended; protobuf keeps the last value), so still valid ONNX, with other bytes.
    let mut retrained = original.clone();
    retrained.extend_from_slice(&[0x32, 9]);
    retrained.extend_from_slice(b"retrained");
    let patch = json!({ "binaryData": { "model.onnx": ByteString(retrained.clone()) } });
    setup
        .config_maps
        .patch("scorer", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    // The controller acts on spec changes; touch one that leaves the version alone.
    let touch = json!({ "spec": { "revisionHistoryLimit": 5 } });
    setup
        .models
        .patch("model", &PatchParams::default(), &Patch::Merge(&touch))
        .await?;

    let (model, condition) = setup.wait_failed("VersionConflict").await?;
    ensure!(
        condition.message.contains(&sha256_hex(&original))
            && condition.message.contains(&sha256_hex(&retrained)),
        "the message should show the bound and the new digest: {}",
        condition.message
    );
    let status = model.status.as_ref().context("status")?;
    ensure!(
        status.latest_version.as_deref() == Some("1.0"),
        "latestVersion must stay 1.0: {status:?}"
    );
    ensure!(
        status.artifact_digest.as_deref() == Some(digest(&original).as_str()),
        "artifactDigest must stay the original's: {status:?}"
    );
    ensure!(
        status.versions.len() == 1 && status.versions[0].source_digest == digest(&original),
        "version 1.0 must stay bound to the original bytes: {:?}",
        status.versions
    );
    let stored = setup.stored_artifacts()?;
    ensure!(
        stored == [sha256_hex(&original)],
        "only the original may be stored; the store holds {stored:?}"
    );

    setup.finish().await
}

#[tokio::test]
async fn a_file_that_is_not_onnx_fails_with_invalid_model() -> anyhow::Result<()> {
    let setup = Setup::start("model-invalid").await?;
    let not_onnx = b"this is a text file, not an ONNX model\n".repeat(100);
    setup
        .create_model_from_config_map("notes", "1.0", &not_onnx)
        .await?;

    let (_, condition) = setup.wait_failed("InvalidModel").await?;
    // The operator's own words, then what tract's protobuf decoder said.
    ensure!(
        condition.message.contains("not an ONNX model")
            && condition
                .message
                .contains("failed to decode Protobuf message"),
        "the message should say the file is not ONNX and give tract's reason: {}",
        condition.message
    );
    let stored = setup.stored_artifacts()?;
    ensure!(
        stored.is_empty(),
        "an invalid model must not be stored; the store holds {stored:?}"
    );

    setup.finish().await
}

/// A model with a string input loads in tract, but no agent serves string tensors:
/// the operator must refuse it at admission (Failed, never Ready) and say which
/// tensor is a string and what to do, instead of publishing a model that fails on
/// every edge node.
#[tokio::test]
async fn a_model_with_a_string_input_fails_with_invalid_model() -> anyhow::Result<()> {
    let setup = Setup::start("model-string-input").await?;
    setup
        .create_model_from_config_map("echo", "1.0", &string_input_onnx_model())
        .await?;

    // Failed is terminal for this version: waiting for it also proves the model
    // was not Ready first (a Ready model would stay Ready and the wait time out).
    let (model, condition) = setup.wait_failed("InvalidModel").await?;
    ensure!(
        condition.message.contains("input `text`")
            && condition.message.contains("string")
            && condition.message.contains("numeric and bool tensors only"),
        "the message should name the string input and say agents serve numeric and bool \
         tensors only: {}",
        condition.message
    );
    let status = model.status.as_ref().context("status")?;
    ensure!(
        status.latest_version.is_none() && status.artifact_digest.is_none(),
        "a refused model must publish no version: {status:?}"
    );
    let stored = setup.stored_artifacts()?;
    ensure!(
        stored.is_empty(),
        "a refused model must not be stored; the store holds {stored:?}"
    );

    setup.finish().await
}

/// Issue: an http source could name any host (cloud metadata, loopback, cluster
/// Services) and redirects were followed anywhere, so a Model author could make the
/// operator read internal endpoints. The operator here allows only 127.0.0.2.
#[tokio::test]
async fn sources_that_reach_internal_addresses_are_refused_before_connecting() -> anyhow::Result<()>
{
    let setup =
        Setup::start_with_args("model-ssrf", &["--allow-source-network", "127.0.0.2/32"]).await?;
    let onnx = tiny_onnx_model();
    let sha256 = sha256_hex(&onnx);

    // The cloud metadata address: nothing listens there, so a connection attempt
    // would end in a timeout (FetchFailed), not in this refusal.
    setup
        .create_model(json!({
            "version": "1.0",
            "source": { "http": { "url": "http://169.254.169.254/latest/meta-data/model.onnx", "sha256": sha256 } },
        }))
        .await?;
    let (_, condition) = setup.wait_failed("SourceRefused").await?;
    ensure!(
        condition
            .message
            .contains("169.254.169.254 is a link-local address")
            && condition.message.contains("--allow-source-network"),
        "the refusal names the address and the way to allow it: {}",
        condition.message
    );

    // An allowed source (127.0.0.2) that redirects to loopback (127.0.0.1, not
    // allowed): the redirect is not followed, the file there is never read.
    let (target, target_server) = serve_file(onnx.clone()).await?;
    let (redirect, redirect_server) = serve_redirect("127.0.0.2", target.clone()).await?;
    setup
        .models
        .patch(
            "model",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "source": { "http": { "url": redirect } } } })),
        )
        .await?;
    let model = wait_for(&setup.models, "model", WAIT, |model| {
        ready_condition(model).is_some_and(|c| {
            c.reason == "SourceRefused" && c.message.contains("redirected to http://127.0.0.1:")
        })
    })
    .await
    .context("the redirect to loopback was not refused")?;
    let condition = ready_condition(&model).context("the Ready condition")?;
    ensure!(
        condition.message.contains("loopback"),
        "the refusal says why: {}",
        condition.message
    );
    ensure!(
        model.status.as_ref().is_some_and(|s| s.versions.is_empty()),
        "nothing was published: {:?}",
        model.status
    );
    ensure!(setup.stored_artifacts()?.is_empty(), "nothing was stored");

    target_server.abort();
    redirect_server.abort();
    setup.finish().await
}
