//! The agent's on-disk cache: artifacts by digest and the last-known-good
//! assignment. It is what lets an agent restarted while the WAN is down serve
//! again at once. Writes go to a temp file first and are renamed into place, so a
//! crash never leaves a half-written artifact or assignment behind.

use shoal_api::agent_protocol::Assignment;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const ASSIGNMENT_FILE: &str = "last-known-good.json";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "{what} {path}: {source}; check that the cache directory is writable and has free space"
    )]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0:?} is not a sha256 digest (sha256:<64 lowercase hex>)")]
    InvalidDigest(String),
    #[error(
        "the cache has no room for {needed} more bytes ({used} of {limit} bytes are used by cached \
         artifacts and downloads); raise the EdgePool's spec.agent.cacheSize"
    )]
    Full { needed: u64, used: u64, limit: u64 },
    #[error(
        "the downloaded artifact has sha256 {actual} but the assignment says {expected}; it was discarded"
    )]
    DigestMismatch { expected: String, actual: String },
}

/// The cache directory: `artifacts/sha256/<hex>`, `tmp/`, `last-known-good.json`.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn open(root: impl Into<PathBuf>) -> Result<Cache, CacheError> {
        let cache = Cache { root: root.into() };
        for dir in [cache.artifacts_dir(), cache.temp_dir()] {
            fs::create_dir_all(&dir).map_err(|source| CacheError::Io {
                what: "cannot create",
                path: dir,
                source,
            })?;
        }
        Ok(cache)
    }

    fn artifacts_dir(&self) -> PathBuf {
        self.root.join("artifacts").join("sha256")
    }

    fn temp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the complete artifact with this digest lives, once verified.
    pub fn artifact_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self.artifacts_dir().join(digest_hex(digest)?))
    }

    /// Where a download of this digest in progress lives; its length is where a
    /// resumed download starts.
    pub fn partial_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self
            .temp_dir()
            .join(format!("{}.partial", digest_hex(digest)?)))
    }

    /// The artifact's bytes if it is complete in the cache.
    pub fn read_artifact(&self, digest: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.artifact_path(digest)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CacheError::Io {
                what: "cannot read",
                path,
                source,
            }),
        }
    }

    /// Verifies a finished download against its digest and moves it into place.
    /// A mismatch deletes the partial file: the next attempt starts over.
    pub fn commit_download(&self, digest: &str) -> Result<PathBuf, CacheError> {
        let partial = self.partial_path(digest)?;
        let actual = sha256_file(&partial)?;
        let expected = digest_hex(digest)?.to_string();
        if actual != expected {
            let _ = fs::remove_file(&partial);
            return Err(CacheError::DigestMismatch { expected, actual });
        }
        let target = self.artifact_path(digest)?;
        fs::rename(&partial, &target).map_err(|source| CacheError::Io {
            what: "cannot move into place",
            path: target.clone(),
            source,
        })?;
        Ok(target)
    }

    /// The assignment the agent last served completely, if any.
    pub fn last_known_good(&self) -> Option<Assignment> {
        let bytes = fs::read(self.root.join(ASSIGNMENT_FILE)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(assignment) => Some(assignment),
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable last-known-good assignment");
                None
            }
        }
    }

    /// Records `assignment` as last-known-good (temp file, fsync, rename).
    pub fn save_last_known_good(&self, assignment: &Assignment) -> Result<(), CacheError> {
        let path = self.root.join(ASSIGNMENT_FILE);
        let temp = self.temp_dir().join(format!("{ASSIGNMENT_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(assignment).unwrap_or_default();
        let write = || -> io::Result<()> {
            let mut file = File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&temp, &path)
        };
        write().map_err(|source| CacheError::Io {
            what: "cannot write",
            path,
            source,
        })
    }

    /// Fails with [`CacheError::Full`] unless the artifact `digest` of `size`
    /// bytes fits under `limit` beside the artifacts and the other partial
    /// downloads already cached. Its own partial download is part of `size`, so
    /// it counts once: a resumed download needs room only for what is missing.
    pub fn ensure_room_for(&self, digest: &str, size: u64, limit: u64) -> Result<(), CacheError> {
        let own_partial = self.partial_path(digest)?;
        let mut others = 0u64;
        let mut downloaded = 0u64;
        for dir in [self.artifacts_dir(), self.temp_dir()] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(metadata) = entry.metadata() else {
                    continue;
                };
                if entry.path() == own_partial {
                    downloaded = metadata.len();
                } else {
                    others = others.saturating_add(metadata.len());
                }
            }
        }
        let needed = size.saturating_sub(downloaded);
        let used = others.saturating_add(downloaded);
        if used.saturating_add(needed) > limit {
            return Err(CacheError::Full {
                needed,
                used,
                limit,
            });
        }
        Ok(())
    }

    /// Deletes partial downloads of digests not in `keep`: an assignment moved
    /// on before they finished, and they would hold cache room forever.
    pub fn remove_stale_partials(&self, keep: &[String]) {
        let keep: Vec<String> = keep
            .iter()
            .filter_map(|d| digest_hex(d).ok())
            .map(|hex| format!("{hex}.partial"))
            .collect();
        let Ok(entries) = fs::read_dir(self.temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name.ends_with(".partial") && !keep.iter().any(|kept| kept == name) {
                tracing::info!(
                    file = name,
                    "removing a partial download no longer assigned"
                );
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Deletes artifacts and partial downloads no assignment needs any more,
    /// keeping `keep` (digests).
    pub fn remove_unused(&self, keep: &[String]) {
        self.remove_stale_partials(keep);
        let keep: Vec<&str> = keep.iter().filter_map(|d| digest_hex(d).ok()).collect();
        let Ok(entries) = fs::read_dir(self.artifacts_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !keep.iter().any(|hex| name.to_str() == Some(hex)) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Parses a Kubernetes quantity of bytes: `1073741824`, `512Mi`, `2Gi`, `1G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 512Mi or 2Gi"))?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {suffix:?}; use k, M, G, T, Ki, Mi, Gi or Ti"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// The bare hex of `sha256:<hex>` (or of bare hex), validated.
pub fn digest_hex(digest: &str) -> Result<&str, CacheError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(hex)
    } else {
        Err(CacheError::InvalidDigest(digest.to_string()))
    }
}

fn sha256_file(path: &Path) -> Result<String, CacheError> {
    use sha2::{Digest, Sha256};
    let io_error = |source| CacheError::Io {
        what: "cannot read",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer).map_err(io_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::agent_protocol::AssignedModel;

    fn digest_of(bytes: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    #[test]
    fn verified_download_moves_into_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("opens");
        let digest = digest_of(b"model bytes");
        fs::write(cache.partial_path(&digest).expect("path"), b"model bytes").expect("write");
        cache.commit_download(&digest).expect("commits");
        assert_eq!(
            cache.read_artifact(&digest).expect("reads").as_deref(),
            Some(&b"model bytes"[..])
        );
        assert!(!cache.partial_path(&digest).expect("path").exists());
    }

    #[test]
    fn corrupt_download_is_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("opens");
        let digest = digest_of(b"the real bytes");
        fs::write(cache.partial_path(&digest).expect("path"), b"tampered").expect("write");
        let error = cache.commit_download(&digest).expect_err("must refuse");
        assert!(
            matches!(error, CacheError::DigestMismatch { .. }),
            "{error}"
        );
        assert!(!cache.partial_path(&digest).expect("path").exists());
        assert_eq!(cache.read_artifact(&digest).expect("reads"), None);
    }

    #[test]
    fn last_known_good_round_trips_and_unused_artifacts_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("opens");
        assert_eq!(cache.last_known_good(), None);
        let keep = digest_of(b"keep");
        let drop = digest_of(b"drop");
        for (digest, bytes) in [(&keep, &b"keep"[..]), (&drop, &b"drop"[..])] {
            fs::write(cache.partial_path(digest).expect("path"), bytes).expect("write");
            cache.commit_download(digest).expect("commits");
        }
        let assignment = Assignment {
            node: "n1".into(),
            models: vec![AssignedModel {
                name: "m".into(),
                version: "1".into(),
                artifact_digest: keep.clone(),
                ..Default::default()
            }],
        };
        cache.save_last_known_good(&assignment).expect("saves");
        assert_eq!(cache.last_known_good(), Some(assignment));
        cache.remove_unused(std::slice::from_ref(&keep));
        assert!(cache.read_artifact(&keep).expect("reads").is_some());
        assert!(cache.read_artifact(&drop).expect("reads").is_none());
    }

    #[test]
    fn sizes_parse_like_kubernetes_quantities() {
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2GB").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn room_is_checked_against_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("opens");
        let digest = digest_of(b"0123456789");
        fs::write(cache.partial_path(&digest).expect("path"), b"0123456789").expect("write");
        cache.commit_download(&digest).expect("commits");
        let other = digest_of(b"another artifact");
        assert!(cache.ensure_room_for(&other, 90, 100).is_ok());
        let error = cache.ensure_room_for(&other, 91, 100).expect_err("full");
        assert!(
            matches!(error, CacheError::Full { used: 10, .. }),
            "{error}"
        );
    }

    #[test]
    fn a_download_counts_its_own_partial_once_and_other_partials_fully() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("opens");
        let stable = digest_of(&[b's'; 30]);
        fs::write(cache.partial_path(&stable).expect("path"), [b's'; 30]).expect("write");
        cache.commit_download(&stable).expect("commits");
        let new = digest_of(&[b'n'; 60]);
        fs::write(cache.partial_path(&new).expect("path"), [b'n'; 40]).expect("write");
        // 30 B cached and 60 B for the new artifact, 40 of them already here.
        assert!(cache.ensure_room_for(&new, 60, 100).is_ok());
        assert!(cache.ensure_room_for(&new, 70, 100).is_ok());
        let error = cache.ensure_room_for(&new, 71, 100).expect_err("full");
        assert!(
            matches!(
                error,
                CacheError::Full {
                    needed: 31,
                    used: 70,
                    limit: 100
                }
            ),
            "{error}"
        );
        // Another download in progress takes room until it is removed.
        let stale = digest_of(b"stale");
        fs::write(cache.partial_path(&stale).expect("path"), [b'x'; 20]).expect("write");
        assert!(cache.ensure_room_for(&new, 60, 100).is_err());
        cache.remove_stale_partials(&[stable.clone(), new.clone()]);
        assert!(!cache.partial_path(&stale).expect("path").exists());
        assert!(cache.partial_path(&new).expect("path").exists(), "kept");
        assert!(cache.ensure_room_for(&new, 60, 100).is_ok());
    }

    #[test]
    fn digests_are_validated_before_building_paths() {
        assert!(digest_hex("sha256:../../etc/passwd").is_err());
        assert!(digest_hex(&"A".repeat(64)).is_err());
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
