//! Real models the tests load, fetched by `make test-models` or trained by `make
//! example-model`, and the digest the operator names artifacts by.

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Lowercase hex SHA-256 of `bytes`, as `sha256sum` prints it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The magika 1.0.3 file-type classifier (3 MB; input `bytes` int32 [N, 2048],
/// output `target_label` float [N, 214]) from `$SHOAL_TEST_MAGIKA_ONNX`.
pub fn magika_onnx() -> anyhow::Result<Vec<u8>> {
    read_test_model("SHOAL_TEST_MAGIKA_ONNX", "magika-1.0.3/model.onnx")
}

/// PP-OCR mobile v2.0 text-direction classifier from rapidocr-onnxruntime 1.4.4
/// (585 KB, small enough for a ConfigMap, whose data is limited to 1 MiB; input `x`
/// float [N, 3, H, W], output float [N, 2]) from `$SHOAL_TEST_PPOCR_CLS_ONNX`.
pub fn ppocr_cls_onnx() -> anyhow::Result<Vec<u8>> {
    read_test_model(
        "SHOAL_TEST_PPOCR_CLS_ONNX",
        "rapidocr-onnxruntime-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    )
}

/// The example recommender (examples/recommender/) trained by `make example-model`:
/// `recommender.onnx` (input `user_id` int64 `[batch]`, output `scores` float
/// `[batch, 1682]`) and `validation.jsonl`, in `$SHOAL_RECOMMENDER_DIR`.
pub fn recommender_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("SHOAL_RECOMMENDER_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .context("SHOAL_RECOMMENDER_DIR is not set; run the tests with `make test` (or `make example-model` and export it)")?;
    anyhow::ensure!(
        dir.join("recommender.onnx").is_file(),
        "{} has no recommender.onnx; run `make example-model`",
        dir.display()
    );
    Ok(dir)
}

/// Reads a model from `$variable`, else from where `make test-models` caches it.
fn read_test_model(variable: &str, cached: &str) -> anyhow::Result<Vec<u8>> {
    let path = match std::env::var_os(variable) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => {
            let cache = match std::env::var_os("SHOAL_CACHE") {
                Some(cache) if !cache.is_empty() => PathBuf::from(cache),
                _ => {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/shoal")
                }
            };
            cache.join("models").join(cached)
        }
    };
    std::fs::read(&path).with_context(|| {
        format!("cannot read the test model {} (set {variable}); fetch the models with `make test-models`", path.display())
    })
}
