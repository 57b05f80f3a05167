//! `shoal-agent prepare-cache`: gives the agent's cache directory to the agent's
//! user before the agent starts.
//!
//! The agent DaemonSet keeps its cache on a `DirectoryOrCreate` hostPath, which
//! the kubelet creates `root:root` with mode 0755; `fsGroup` does not apply to
//! hostPath volumes, so the agent (uid 65532) could not write there. An init
//! container from the same image runs this as uid 0 with only the CHOWN
//! capability. It changes the owner of that one directory, nothing inside it and
//! nothing above it: what is inside was written by the agent and is its already.
//! It never changes the mode, because after the first chown root is no longer the
//! owner and would need FOWNER for that; the kubelet's 0755 already lets the
//! owner write.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A numeric `UID:GID` pair. Numeric only: the agent image has no /etc/group
/// worth trusting, and the DaemonSet passes the same numbers it runs the agent as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl FromStr for Owner {
    type Err = String;

    fn from_str(text: &str) -> Result<Owner, String> {
        let Some((uid, gid)) = text.split_once(':') else {
            return Err(format!(
                "{text:?} is not UID:GID; give numbers, for example 65532:65532"
            ));
        };
        let number = |part: &str, what: &str| {
            part.parse::<u32>().map_err(|_| {
                format!("{what} {part:?} in {text:?} is not a number; give UID:GID, for example 65532:65532")
            })
        };
        Ok(Owner {
            uid: number(uid, "uid")?,
            gid: number(gid, "gid")?,
        })
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// What [`prepare`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// The directory already belonged to the owner: nothing changed (every
    /// restart of an agent pod after the first).
    AlreadyOwned,
    /// The directory belonged to `from` and now belongs to the owner.
    Chowned { from: Owner },
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "cannot create the cache directory {path}: {source}; check that the model-cache volume is mounted there"
    )]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect the cache directory {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a directory (it is a symlink or a file); remove it on the node so the kubelet can create the directory"
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "cannot give the cache directory {path} to {owner}: {source}; prepare-cache must run as uid 0 with the CHOWN capability (the EdgePool's DaemonSet sets this on its prepare-cache init container; check that no admission policy removed it)"
    )]
    Chown {
        path: PathBuf,
        owner: Owner,
        #[source]
        source: io::Error,
    },
    #[error(
        "the cache directory {path} has mode {mode:o}, so its owner cannot write to it; run chmod u+rwx on it on the node"
    )]
    OwnerCannotWrite { path: PathBuf, mode: u32 },
}

/// Creates `dir` if it is missing and makes `owner` its owner. Idempotent: a
/// directory that already belongs to `owner` is left alone, so this needs no
/// capability at all after the first run. Refuses a symlink, so that whatever
/// the agent may have put on the node's disk cannot make root chown another path.
pub fn prepare(dir: &Path, owner: Owner) -> Result<Prepared, PrepareError> {
    let inspect = |source| PrepareError::Inspect {
        path: dir.to_path_buf(),
        source,
    };
    let metadata = match fs::symlink_metadata(dir) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|source| PrepareError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
            fs::symlink_metadata(dir).map_err(inspect)?
        }
        Err(error) => return Err(inspect(error)),
    };
    if !metadata.file_type().is_dir() {
        return Err(PrepareError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o700 != 0o700 {
        return Err(PrepareError::OwnerCannotWrite {
            path: dir.to_path_buf(),
            mode,
        });
    }
    let current = Owner {
        uid: metadata.uid(),
        gid: metadata.gid(),
    };
    if current == owner {
        return Ok(Prepared::AlreadyOwned);
    }
    // lchown: the directory itself, never a link target (checked above too, but
    // the path could be swapped between the check and the call).
    std::os::unix::fs::lchown(dir, Some(owner.uid), Some(owner.gid)).map_err(|source| {
        PrepareError::Chown {
            path: dir.to_path_buf(),
            owner,
            source,
        }
    })?;
    Ok(Prepared::Chowned { from: current })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(path: &Path) -> Owner {
        let metadata = fs::metadata(path).expect("metadata");
        Owner {
            uid: metadata.uid(),
            gid: metadata.gid(),
        }
    }

    #[test]
    fn owner_parses_numbers_only() {
        assert_eq!(
            "65532:65532".parse::<Owner>(),
            Ok(Owner {
                uid: 65532,
                gid: 65532
            })
        );
        assert_eq!(
            "0:10".parse::<Owner>().map(|o| o.to_string()).as_deref(),
            Ok("0:10")
        );
        for bad in ["65532", "nonroot:nonroot", "1:", ":1", "-1:0", "1:2:3"] {
            assert!(bad.parse::<Owner>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn a_missing_directory_is_created_and_an_owned_one_left_alone() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().join("var/cache/shoal");
        // The test runs unprivileged: the only owner it may set is its own.
        let me = own(temp.path());
        assert_eq!(prepare(&dir, me).expect("prepares"), Prepared::AlreadyOwned);
        assert!(dir.is_dir());
        // A second run (the next pod start) changes nothing and still succeeds.
        fs::write(dir.join("last-known-good.json"), b"{}").expect("write");
        assert_eq!(prepare(&dir, me).expect("prepares"), Prepared::AlreadyOwned);
        assert!(dir.join("last-known-good.json").exists());
    }

    #[test]
    fn another_owner_is_set_as_root_and_refused_with_advice_otherwise() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().join("cache");
        fs::create_dir(&dir).expect("mkdir");
        let before = own(&dir);
        let agent = Owner {
            uid: 65532,
            gid: 65532,
        };
        match prepare(&dir, agent) {
            // Running as root (a container build): the chown happens.
            Ok(prepared) => {
                assert_eq!(before.uid, 0, "only root may give a directory away");
                assert_eq!(prepared, Prepared::Chowned { from: before });
                assert_eq!(own(&dir), agent);
                assert_eq!(prepare(&dir, agent).expect("again"), Prepared::AlreadyOwned);
            }
            // Unprivileged: EPERM, with what to check next.
            Err(error) => {
                assert!(matches!(error, PrepareError::Chown { .. }), "{error}");
                let message = error.to_string();
                assert!(message.contains("65532:65532"), "{message}");
                assert!(
                    message.contains("uid 0 with the CHOWN capability"),
                    "{message}"
                );
                assert_eq!(own(&dir), before, "nothing changed");
            }
        }
    }

    #[test]
    fn a_symlink_or_a_file_is_refused() {
        let temp = tempfile::tempdir().expect("tempdir");
        let me = own(temp.path());
        let target = temp.path().join("elsewhere");
        fs::create_dir(&target).expect("mkdir");
        let link = temp.path().join("cache");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(matches!(
            prepare(&link, me),
            Err(PrepareError::NotADirectory { .. })
        ));
        let file = temp.path().join("file");
        fs::write(&file, b"").expect("write");
        assert!(matches!(
            prepare(&file, me),
            Err(PrepareError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_directory_its_owner_cannot_write_is_reported() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().join("cache");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).expect("chmod");
        let error = prepare(&dir, own(&dir)).expect_err("not writable");
        assert!(matches!(
            error,
            PrepareError::OwnerCannotWrite { mode: 0o555, .. }
        ));
        assert!(error.to_string().contains("chmod u+rwx"), "{error}");
    }
}
