//! Writes Shoal's container images as OCI image-layout archives without a
//! Docker engine; see `main.rs` for the command and how `make images` uses it.
//!
//! - [`layer`]: the file tree of the one layer and its deterministic tar.
//! - [`image`]: the config, manifest and index documents and their blobs.
//! - [`archive`]: the layout tar itself, and the reader behind `inspect`.
//!
//! Everything here is pure: bytes in, bytes out. Reading the input files and
//! writing the archive is `main.rs`'s job.

pub mod archive;
pub mod image;
pub mod layer;

use anyhow::{Context, bail};

/// The uid and gid of the `nonroot` user, as in distroless images.
pub const NONROOT_ID: u64 = 65532;

/// `/etc/passwd` with root and nonroot (65532), neither with a login shell.
pub const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                          nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";

/// `/etc/group` with root and nonroot (65532).
pub const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";

/// Where the CA bundle goes, the path Debian and distroless use.
pub const CA_CERTIFICATES_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A file to copy into the image: `SRC=DEST`, e.g.
/// `target/x86_64-unknown-linux-musl/image/shoal-agent=/usr/local/bin/shoal-agent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Path on the build machine.
    pub source: String,
    /// Absolute path in the image.
    pub dest: String,
}

/// Parses `SRC=DEST`; DEST must be absolute.
pub fn parse_copy(text: &str) -> Result<CopySpec, String> {
    match text.split_once('=') {
        Some((source, dest)) if !source.is_empty() && dest.starts_with('/') => Ok(CopySpec {
            source: source.to_string(),
            dest: dest.to_string(),
        }),
        _ => Err(format!("expected SRC=/DEST, got {text:?}")),
    }
}

/// A directory to create in the image: `PATH` (root-owned) or `PATH:UID:GID`, mode 0755.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirSpec {
    /// Absolute path in the image.
    pub path: String,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

/// Parses `PATH` or `PATH:UID:GID`; PATH must be absolute.
pub fn parse_dir(text: &str) -> Result<DirSpec, String> {
    let mut parts = text.split(':');
    let path = parts.next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(format!("expected /PATH or /PATH:UID:GID, got {text:?}"));
    }
    let ids: Vec<&str> = parts.collect();
    let (uid, gid) = match ids.as_slice() {
        [] => (0, 0),
        [uid, gid] => (
            uid.parse().map_err(|_| format!("bad uid in {text:?}"))?,
            gid.parse().map_err(|_| format!("bad gid in {text:?}"))?,
        ),
        _ => return Err(format!("expected /PATH or /PATH:UID:GID, got {text:?}")),
    };
    Ok(DirSpec {
        path: path.to_string(),
        uid,
        gid,
    })
}

/// Parses `KEY=VALUE` (a label).
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// The time entries and the image are dated with: SOURCE_DATE_EPOCH, which
/// must be a whole number of seconds, not negative.
pub fn parse_epoch(text: &str) -> anyhow::Result<u64> {
    let trimmed = text.trim();
    if trimmed.is_empty() || !trimmed.bytes().all(|byte| byte.is_ascii_digit()) {
        bail!("SOURCE_DATE_EPOCH {text:?} is not a whole number of seconds");
    }
    trimmed
        .parse()
        .with_context(|| format!("SOURCE_DATE_EPOCH {text:?} is too large"))
}

/// Bytes as megabytes (10^6) with two decimals, e.g. `10.69 MB`.
pub fn megabytes(bytes: u64) -> String {
    let hundredths = (bytes + 5_000) / 10_000;
    format!("{}.{:02} MB", hundredths / 100, hundredths % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_needs_an_absolute_destination() {
        assert_eq!(
            parse_copy("bin/x=/usr/local/bin/x"),
            Ok(CopySpec {
                source: "bin/x".to_string(),
                dest: "/usr/local/bin/x".to_string()
            })
        );
        assert!(parse_copy("bin/x=usr/x").is_err());
        assert!(parse_copy("=/x").is_err());
        assert!(parse_copy("bin/x").is_err());
    }

    #[test]
    fn dir_owner_is_optional() {
        assert_eq!(
            parse_dir("/var/lib/shoal/artifacts:65532:65532"),
            Ok(DirSpec {
                path: "/var/lib/shoal/artifacts".to_string(),
                uid: 65532,
                gid: 65532
            })
        );
        assert_eq!(parse_dir("/data").map(|dir| (dir.uid, dir.gid)), Ok((0, 0)));
        assert!(parse_dir("/data:1").is_err());
        assert!(parse_dir("/data:a:b").is_err());
        assert!(parse_dir("data").is_err());
    }

    #[test]
    fn key_value_keeps_equals_in_the_value() {
        assert_eq!(
            parse_key_value("a=b=c"),
            Ok(("a".to_string(), "b=c".to_string()))
        );
        assert!(parse_key_value("=x").is_err());
    }

    #[test]
    fn epoch_is_whole_seconds() -> anyhow::Result<()> {
        assert_eq!(parse_epoch("1776160800\n")?, 1_776_160_800);
        assert!(parse_epoch("-1").is_err());
        assert!(parse_epoch("1.5").is_err());
        assert!(parse_epoch("").is_err());
        Ok(())
    }

    #[test]
    fn megabytes_round_to_hundredths() {
        assert_eq!(megabytes(10_692_139), "10.69 MB");
        assert_eq!(megabytes(4_999), "0.00 MB");
        assert_eq!(megabytes(1_000_000), "1.00 MB");
    }
}
