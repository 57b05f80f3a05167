//! The operator's content-addressed artifact store: every model blob (source or
//! compressed) lives once under `<dir>/sha256/<hex>` and is served to agents from there.
//! All calls do blocking file I/O and hashing; async callers wrap them in `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Temp files older than this are leftovers of a crashed or killed writer. A live
/// write of even a large model finishes well within it, so removing them is safe.
const STALE_TEMP_AGE: Duration = Duration::from_secs(60 * 60);

/// Makes temp file names unique within this process; the pid makes them unique
/// across processes that share the volume (an old and a new leader, briefly).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "`{digest}` is not a sha256 digest: expected 64 lowercase hex characters without a `sha256:` prefix"
    )]
    InvalidDigest { digest: String },

    #[error(
        "the content has sha256 {actual}, but {expected} was expected: either the file at the source \
         changed or the declared sha256 is wrong; fix the source or the sha256 in the Model spec"
    )]
    DigestMismatch { expected: String, actual: String },

    #[error(
        "artifact {digest} is not in the artifact store ({path}); it must be fetched again from the \
         Model's source (was the store volume replaced or cleaned?)"
    )]
    NotFound { digest: String, path: PathBuf },

    #[error(
        "could not {action} {path}: {source}; check that the artifact store volume is mounted, \
         writable and not full"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    /// A short, fixed label for the `reason` of an error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::InvalidDigest { .. } => "invalid_digest",
            StoreError::DigestMismatch { .. } => "digest_mismatch",
            StoreError::NotFound { .. } => "not_found",
            StoreError::Io { .. } => "io",
        }
    }
}

/// A blob that is durably in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    /// Lowercase hex sha256 of the content, without a `sha256:` prefix.
    pub digest: String,
    pub bytes: u64,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    blobs_dir: PathBuf,
    temp_dir: PathBuf,
}

impl ArtifactStore {
    /// Opens (creating if needed) a store rooted at `dir` and removes temp files
    /// that a crashed writer left behind.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        let store = ArtifactStore {
            blobs_dir: dir.join("sha256"),
            temp_dir: dir.join("tmp"),
        };
        for sub in [&store.blobs_dir, &store.temp_dir] {
            fs::create_dir_all(sub).map_err(|source| io_error("create directory", sub, source))?;
        }
        store.remove_stale_temp_files();
        Ok(store)
    }

    /// Stores `bytes` under their sha256 and returns where they are.
    ///
    /// When `expected_sha256` is given and does not match, nothing is written: a
    /// wrong download must never become an artifact. Storing the same content twice
    /// is cheap and returns the same result.
    pub fn put_verified(
        &self,
        bytes: &[u8],
        expected_sha256: Option<&str>,
    ) -> Result<StoredArtifact, StoreError> {
        if let Some(expected) = expected_sha256 {
            validate_digest(expected)?;
        }
        let digest = sha256_hex(bytes);
        if let Some(expected) = expected_sha256
            && expected != digest
        {
            return Err(StoreError::DigestMismatch {
                expected: expected.to_string(),
                actual: digest,
            });
        }

        let final_path = self.blobs_dir.join(&digest);
        let stored = StoredArtifact {
            digest,
            bytes: bytes.len() as u64,
            path: final_path.clone(),
        };
        // A blob is only ever created by rename, so one with the right size is
        // complete. A size mismatch means the file was damaged; it is replaced below.
        if let Ok(metadata) = fs::metadata(&final_path)
            && metadata.is_file()
            && metadata.len() == stored.bytes
        {
            return Ok(stored);
        }

        let temp_path = self.temp_dir.join(format!(
            "{}.{}.{}.partial",
            stored.digest,
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(err) = write_durably(&temp_path, bytes) {
            let _ = fs::remove_file(&temp_path);
            return Err(err);
        }
        // rename is atomic: readers see either no blob or the whole blob.
        if let Err(source) = fs::rename(&temp_path, &final_path) {
            let _ = fs::remove_file(&temp_path);
            return Err(io_error("move blob into place at", &final_path, source));
        }
        // Without syncing the directory, a power loss can forget the rename even
        // though the content itself was synced.
        sync_dir(&self.blobs_dir)?;
        Ok(stored)
    }

    /// Where the blob with this digest lives (whether or not it exists yet).
    pub fn path(&self, digest_hex: &str) -> Result<PathBuf, StoreError> {
        validate_digest(digest_hex)?;
        Ok(self.blobs_dir.join(digest_hex))
    }

    pub fn contains(&self, digest_hex: &str) -> Result<bool, StoreError> {
        let path = self.path(digest_hex)?;
        match fs::metadata(&path) {
            Ok(metadata) => Ok(metadata.is_file()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(io_error("inspect", &path, source)),
        }
    }

    /// Reads a whole blob into memory (for the compressor and validator).
    pub fn read(&self, digest_hex: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(digest_hex)?;
        fs::read(&path).map_err(|source| not_found_or_io(digest_hex, "read", &path, source))
    }

    /// Opens a blob for streaming (serving agents, Range requests).
    pub fn open_file(&self, digest_hex: &str) -> Result<File, StoreError> {
        let path = self.path(digest_hex)?;
        File::open(&path).map_err(|source| not_found_or_io(digest_hex, "open", &path, source))
    }

    /// Best effort: a failure here only costs disk space, so it is logged, not returned.
    fn remove_stale_temp_files(&self) {
        let entries = match fs::read_dir(&self.temp_dir) {
            Ok(entries) => entries,
            Err(err) => {
                tracing::warn!(dir = %self.temp_dir.display(), error = %err, "cannot list artifact temp dir");
                return;
            }
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let is_stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| now.duration_since(modified).ok())
                .is_some_and(|age| age > STALE_TEMP_AGE);
            if is_stale && let Err(err) = fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %err, "cannot remove stale artifact temp file");
            }
        }
    }
}

/// Lowercase hex sha256, the digest form used everywhere in Shoal.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Only exactly 64 lowercase hex characters may become a file name: this rules
/// out path traversal (`../`, `/`) and two spellings of one digest.
fn validate_digest(digest: &str) -> Result<(), StoreError> {
    let valid = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        Ok(())
    } else {
        Err(StoreError::InvalidDigest {
            digest: digest.chars().take(80).collect(),
        })
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    // create_new: never write into a file another writer might own.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| io_error("create temp file", path, source))?;
    file.write_all(bytes)
        .map_err(|source| io_error("write temp file", path, source))?;
    file.sync_all()
        .map_err(|source| io_error("sync temp file", path, source))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io_error("sync directory", dir, source))
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn not_found_or_io(
    digest: &str,
    action: &'static str,
    path: &Path,
    source: io::Error,
) -> StoreError {
    if source.kind() == io::ErrorKind::NotFound {
        StoreError::NotFound {
            digest: digest.to_string(),
            path: path.to_path_buf(),
        }
    } else {
        io_error(action, path, source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    // sha256("hello\n"), as printed by `sha256sum`.
    const HELLO_SHA256: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

    fn count_files(dir: &Path) -> usize {
        fs::read_dir(dir).expect("list dir").count()
    }

    #[test]
    fn sha256_hex_matches_sha256sum() {
        assert_eq!(sha256_hex(b"hello\n"), HELLO_SHA256);
    }

    #[test]
    fn open_creates_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("store");
        ArtifactStore::open(&root).expect("open");
        assert!(root.join("sha256").is_dir());
        assert!(root.join("tmp").is_dir());
    }

    #[test]
    fn put_then_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");

        let stored = store
            .put_verified(b"hello\n", Some(HELLO_SHA256))
            .expect("put");
        assert_eq!(stored.digest, HELLO_SHA256);
        assert_eq!(stored.bytes, 6);
        assert_eq!(stored.path, dir.path().join("sha256").join(HELLO_SHA256));

        assert!(store.contains(HELLO_SHA256).expect("contains"));
        assert_eq!(store.read(HELLO_SHA256).expect("read"), b"hello\n");
        let mut streamed = Vec::new();
        store
            .open_file(HELLO_SHA256)
            .expect("open_file")
            .read_to_end(&mut streamed)
            .expect("read file");
        assert_eq!(streamed, b"hello\n");
        assert_eq!(
            count_files(&dir.path().join("tmp")),
            0,
            "temp file left behind"
        );
    }

    #[test]
    fn put_without_expected_digest_computes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");
        let stored = store.put_verified(b"hello\n", None).expect("put");
        assert_eq!(stored.digest, HELLO_SHA256);
    }

    #[test]
    fn put_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");
        let first = store.put_verified(b"hello\n", None).expect("first put");
        let second = store
            .put_verified(b"hello\n", Some(HELLO_SHA256))
            .expect("second put");
        assert_eq!(first, second);
        assert_eq!(count_files(&dir.path().join("sha256")), 1);
    }

    #[test]
    fn put_replaces_a_damaged_blob() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");
        let path = store.path(HELLO_SHA256).expect("path");
        fs::write(&path, b"hel").expect("write truncated blob");

        store.put_verified(b"hello\n", None).expect("put");
        assert_eq!(fs::read(&path).expect("read"), b"hello\n");
    }

    #[test]
    fn digest_mismatch_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");
        let wrong = "0".repeat(64);

        let err = store
            .put_verified(b"hello\n", Some(&wrong))
            .expect_err("mismatch must fail");
        match &err {
            StoreError::DigestMismatch { expected, actual } => {
                assert_eq!(expected, &wrong);
                assert_eq!(actual, HELLO_SHA256);
            }
            other => panic!("unexpected error: {other}"),
        }
        assert_eq!(err.metric_label(), "digest_mismatch");
        assert!(err.to_string().contains(HELLO_SHA256));
        assert_eq!(count_files(&dir.path().join("sha256")), 0);
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn rejects_malformed_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");
        let bad = [
            "",
            "../../etc/passwd",
            &HELLO_SHA256.to_uppercase(),
            &format!("sha256:{HELLO_SHA256}"),
            &HELLO_SHA256[..63],
            &format!("{HELLO_SHA256}0"),
            &format!("{}/..", &HELLO_SHA256[..61]),
        ];
        for digest in bad {
            let err = store.path(digest).expect_err(digest);
            assert_eq!(err.metric_label(), "invalid_digest", "{digest}");
            assert!(matches!(
                store.contains(digest),
                Err(StoreError::InvalidDigest { .. })
            ));
            assert!(matches!(
                store.read(digest),
                Err(StoreError::InvalidDigest { .. })
            ));
            assert!(matches!(
                store.open_file(digest),
                Err(StoreError::InvalidDigest { .. })
            ));
            assert!(matches!(
                store.put_verified(b"hello\n", Some(digest)),
                Err(StoreError::InvalidDigest { .. })
            ));
        }
        assert_eq!(count_files(&dir.path().join("sha256")), 0);
    }

    #[test]
    fn missing_blob_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path()).expect("open");
        assert!(!store.contains(HELLO_SHA256).expect("contains"));
        let err = store.read(HELLO_SHA256).expect_err("read missing");
        assert_eq!(err.metric_label(), "not_found");
        let err = store.open_file(HELLO_SHA256).expect_err("open missing");
        assert_eq!(err.metric_label(), "not_found");
    }

    #[test]
    fn open_removes_only_stale_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        ArtifactStore::open(dir.path()).expect("first open");
        let temp_dir = dir.path().join("tmp");
        let stale = temp_dir.join("stale.partial");
        let fresh = temp_dir.join("fresh.partial");
        fs::write(&stale, b"x").expect("write stale");
        fs::write(&fresh, b"x").expect("write fresh");
        let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 60 * 60);
        File::options()
            .write(true)
            .open(&stale)
            .expect("open stale")
            .set_modified(two_hours_ago)
            .expect("age stale file");

        ArtifactStore::open(dir.path()).expect("second open");
        assert!(!stale.exists());
        assert!(fresh.exists());
    }
}
