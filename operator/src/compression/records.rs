//! The operator's memory of finished compressions, beside the artifact store:
//! `<artifact dir>/compressions/<key>.json`, where the key hashes everything that
//! decides the result (compressor version, source digest, options, dataset digest).
//! A reconcile that finds a record reuses its artifact instead of compressing again,
//! so a compression is done once per input even across operator restarts.
//! Blocking file I/O: async callers use `spawn_blocking`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_api::{CompressionMode, ValidationFigures};

use super::{COMPRESSOR_VERSION, Gate, Granularity};

/// What a finished compression produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Digest (sha256:…) of the compressed artifact, present in the store when the gate held.
    pub artifact_digest: String,
    pub artifact_bytes: u64,
    pub source_bytes: u64,
    pub ratio: f64,
    pub validation: ValidationFigures,
    /// Why the gate failed; None when it held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_failure: Option<String>,
}

/// Everything that decides a compression's result.
pub struct KeyInputs<'a> {
    pub source_hex: &'a str,
    pub mode: CompressionMode,
    pub granularity: Granularity,
    pub samples: usize,
    pub dataset_hex: Option<&'a str>,
    pub gate: Gate,
}

/// The record key: a sha256 over every input of the compression.
pub fn key(inputs: &KeyInputs) -> String {
    let text = format!(
        "shoal-compression v{COMPRESSOR_VERSION}\nsource {}\nmode {:?}\ngranularity {:?}\nsamples {}\ndataset {}\nmax-abs-error {:?}\nmin-top1 {:?}\n",
        inputs.source_hex,
        inputs.mode,
        inputs.granularity,
        inputs.samples,
        inputs.dataset_hex.unwrap_or("-"),
        inputs.gate.max_abs_error,
        inputs.gate.min_top1_agreement,
    );
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[derive(Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(artifact_dir: &Path) -> Records {
        Records {
            dir: artifact_dir.join("compressions"),
        }
    }

    /// The record for `key`, if a compression with these inputs finished before. An
    /// unreadable record counts as absent: the compression simply runs again.
    pub fn get(&self, key: &str) -> Option<Record> {
        let bytes = std::fs::read(self.dir.join(format!("{key}.json"))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores `record` under `key`, atomically (temp file, then rename).
    pub fn put(&self, key: &str, record: &Record) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("{key}.json"));
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(source: &str) -> KeyInputs<'_> {
        KeyInputs {
            source_hex: source,
            mode: CompressionMode::Int8,
            granularity: Granularity::PerTensor,
            samples: 32,
            dataset_hex: None,
            gate: Gate::default(),
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = key(&inputs("aa"));
        assert_eq!(base, key(&inputs("aa")));
        assert_ne!(base, key(&inputs("bb")));
        let mut other = inputs("aa");
        other.mode = CompressionMode::Fp16;
        assert_ne!(base, key(&other));
        let mut other = inputs("aa");
        other.granularity = Granularity::PerChannel;
        assert_ne!(base, key(&other));
        let mut other = inputs("aa");
        other.samples = 33;
        assert_ne!(base, key(&other));
        let mut other = inputs("aa");
        other.dataset_hex = Some("cc");
        assert_ne!(base, key(&other));
        let mut other = inputs("aa");
        other.gate.max_abs_error = Some(0.1);
        assert_ne!(base, key(&other));
        let mut other = inputs("aa");
        other.gate.min_top1_agreement = Some(0.9);
        assert_ne!(base, key(&other));
    }

    #[test]
    fn records_round_trip_and_garbage_reads_as_absent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let records = Records::new(dir.path());
        assert_eq!(records.get("k"), None);
        let record = Record {
            artifact_digest: "sha256:ab".into(),
            artifact_bytes: 10,
            source_bytes: 40,
            ratio: 4.0,
            validation: ValidationFigures {
                samples: 2,
                max_abs_error: 0.5,
                mean_abs_error: 0.1,
                top1_agreement: Some(1.0),
            },
            gate_failure: Some("too far".into()),
        };
        records.put("k", &record).expect("put");
        assert_eq!(records.get("k"), Some(record));
        std::fs::write(dir.path().join("compressions/bad.json"), b"{").expect("write");
        assert_eq!(records.get("bad"), None);
    }
}
