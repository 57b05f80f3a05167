//! The file tree of an image's one layer, and its tar encoding.
//!
//! Entries are kept sorted by path and every header field is set explicitly
//! (mode, uid, gid, mtime; no user or group names), so the same tree and the
//! same mtime always give the same bytes.

use std::collections::BTreeMap;
use std::io;

use anyhow::{Context, bail};

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
}

/// One file or directory of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File or directory.
    pub kind: Kind,
    /// Permission bits, e.g. `0o755` or `0o1777`.
    pub mode: u32,
    /// Owner's user id.
    pub uid: u64,
    /// Owner's group id.
    pub gid: u64,
    /// False for a parent directory the layer added by itself (root, 0755);
    /// an explicit `add_dir` may replace such an entry, nothing else may.
    pub explicit: bool,
}

/// A layer's file tree: paths relative to `/`, without a leading or trailing slash.
#[derive(Debug, Default, Clone)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
}

/// Turns `/usr/local/bin/x` or `usr/local/bin/x/` into `usr/local/bin/x`, and
/// rejects paths that are empty or have `.`, `..` or empty components.
pub fn normalize_path(path: &str) -> anyhow::Result<String> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty() {
        bail!("path {path:?} names the root directory or nothing");
    }
    for component in trimmed.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            bail!("path {path:?} has an empty, '.' or '..' component");
        }
    }
    Ok(trimmed.to_string())
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entries, sorted by path (every parent before its children).
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// Adds a directory. Its missing parents are added as root-owned 0755.
    pub fn add_dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> anyhow::Result<()> {
        let path = normalize_path(path)?;
        self.add_parents(&path)?;
        let entry = Entry {
            kind: Kind::Dir,
            mode,
            uid,
            gid,
            explicit: true,
        };
        self.insert(path, entry)
    }

    /// Adds a regular file. Its missing parents are added as root-owned 0755.
    pub fn add_file(
        &mut self,
        path: &str,
        contents: Vec<u8>,
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> anyhow::Result<()> {
        let path = normalize_path(path)?;
        self.add_parents(&path)?;
        let entry = Entry {
            kind: Kind::File(contents),
            mode,
            uid,
            gid,
            explicit: true,
        };
        self.insert(path, entry)
    }

    /// Inserts an explicit entry; only an implicit parent directory may be replaced.
    fn insert(&mut self, path: String, entry: Entry) -> anyhow::Result<()> {
        if let Some(existing) = self.entries.get(&path) {
            let replaceable = !existing.explicit && entry.kind == Kind::Dir;
            if !replaceable {
                bail!("/{path} is added twice to the layer");
            }
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Adds every missing parent directory of `path` as root-owned 0755.
    fn add_parents(&mut self, path: &str) -> anyhow::Result<()> {
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            end += slash;
            let parent = &path[..end];
            match self.entries.get(parent) {
                Some(Entry {
                    kind: Kind::File(_),
                    ..
                }) => bail!("/{parent} is a file, so /{path} cannot be added"),
                Some(_) => {}
                None => {
                    let entry = Entry {
                        kind: Kind::Dir,
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        explicit: false,
                    };
                    self.entries.insert(parent.to_string(), entry);
                }
            }
            end += 1;
        }
        Ok(())
    }

    /// The uncompressed tar of the layer, every entry with modification time `mtime`
    /// (seconds since the Unix epoch).
    pub fn to_tar(&self, mtime: u64) -> anyhow::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            match &entry.kind {
                Kind::Dir => {
                    // The tar crate writes the name without a trailing slash;
                    // the entry type marks it as a directory.
                    let header = header(tar::EntryType::Directory, entry.owner(), 0, mtime);
                    append(&mut builder, header, path, io::empty())?;
                }
                Kind::File(contents) => {
                    let size = u64::try_from(contents.len()).context("file too large")?;
                    let header = header(tar::EntryType::Regular, entry.owner(), size, mtime);
                    append(&mut builder, header, path, contents.as_slice())?;
                }
            }
        }
        builder.into_inner().context("finishing the layer tar")
    }
}

/// Permission bits and owner of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Permission bits.
    pub mode: u32,
    /// User id.
    pub uid: u64,
    /// Group id.
    pub gid: u64,
}

impl Owner {
    /// Owned by root with these permission bits.
    pub fn root(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
        }
    }
}

impl Entry {
    /// The entry's permission bits and owner.
    pub fn owner(&self) -> Owner {
        Owner {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// A ustar header with every field the layer depends on set explicitly.
pub fn header(kind: tar::EntryType, owner: Owner, size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(owner.mode);
    header.set_uid(owner.uid);
    header.set_gid(owner.gid);
    header.set_mtime(mtime);
    header.set_size(size);
    header
}

/// Appends one entry; `append_data` sets the path (with a long-name record if
/// needed) and the checksum.
pub fn append<W: io::Write, R: io::Read>(
    builder: &mut tar::Builder<W>,
    mut header: tar::Header,
    path: &str,
    data: R,
) -> anyhow::Result<()> {
    builder
        .append_data(&mut header, path, data)
        .with_context(|| format!("adding {path} to a tar"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(layer: &Layer) -> Vec<&str> {
        layer.entries().keys().map(String::as_str).collect()
    }

    #[test]
    fn normalize_path_strips_slashes_and_rejects_dots() -> anyhow::Result<()> {
        assert_eq!(normalize_path("/usr/local/bin/x")?, "usr/local/bin/x");
        assert_eq!(normalize_path("tmp/")?, "tmp");
        assert!(normalize_path("/").is_err());
        assert!(normalize_path("/a/../b").is_err());
        assert!(normalize_path("/a//b").is_err());
        assert!(normalize_path("./a").is_err());
        Ok(())
    }

    #[test]
    fn parents_are_added_root_owned_and_sorted_first() -> anyhow::Result<()> {
        let mut layer = Layer::new();
        layer.add_file("/usr/local/bin/tool", b"x".to_vec(), 0o755, 0, 0)?;
        layer.add_file("/etc/passwd", b"p".to_vec(), 0o644, 0, 0)?;
        assert_eq!(
            paths(&layer),
            [
                "etc",
                "etc/passwd",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/tool"
            ]
        );
        let usr = &layer.entries()["usr"];
        assert_eq!(
            (usr.mode, usr.uid, usr.gid, usr.explicit),
            (0o755, 0, 0, false)
        );
        Ok(())
    }

    #[test]
    fn explicit_dir_replaces_implicit_parent_in_any_order() -> anyhow::Result<()> {
        let mut first = Layer::new();
        first.add_dir("/var/lib/shoal", 0o750, 65532, 65532)?;
        first.add_file("/var/lib/shoal/x", Vec::new(), 0o644, 0, 0)?;
        let mut second = Layer::new();
        second.add_file("/var/lib/shoal/x", Vec::new(), 0o644, 0, 0)?;
        second.add_dir("/var/lib/shoal", 0o750, 65532, 65532)?;
        assert_eq!(first.entries(), second.entries());
        assert_eq!(first.entries()["var/lib/shoal"].uid, 65532);
        Ok(())
    }

    #[test]
    fn duplicates_and_files_as_parents_are_errors() -> anyhow::Result<()> {
        let mut layer = Layer::new();
        layer.add_file("/a/b", Vec::new(), 0o644, 0, 0)?;
        assert!(layer.add_file("/a/b", Vec::new(), 0o644, 0, 0).is_err());
        assert!(layer.add_dir("/a/b", 0o755, 0, 0).is_err());
        assert!(layer.add_file("/a/b/c", Vec::new(), 0o644, 0, 0).is_err());
        layer.add_dir("/d", 0o755, 0, 0)?;
        assert!(layer.add_dir("/d", 0o700, 0, 0).is_err());
        Ok(())
    }

    #[test]
    fn tar_has_the_headers_it_was_given() -> anyhow::Result<()> {
        let mut layer = Layer::new();
        layer.add_dir("/tmp", 0o1777, 0, 0)?;
        layer.add_file("/bin/tool", b"hello".to_vec(), 0o755, 0, 0)?;
        layer.add_dir("/data", 0o755, 65532, 65532)?;
        let bytes = layer.to_tar(1_700_000_000)?;
        assert_eq!(
            bytes,
            layer.to_tar(1_700_000_000)?,
            "same input, same bytes"
        );

        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries()? {
            let entry = entry?;
            let header = entry.header();
            seen.push((
                String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                header.mode()?,
                header.uid()?,
                header.gid()?,
                header.mtime()?,
                header.size()?,
            ));
        }
        let expected = [
            ("bin", 0o755, 0, 0, 1_700_000_000, 0),
            ("bin/tool", 0o755, 0, 0, 1_700_000_000, 5),
            ("data", 0o755, 65532, 65532, 1_700_000_000, 0),
            ("tmp", 0o1777, 0, 0, 1_700_000_000, 0),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(p, m, u, g, t, s)| (p.to_string(), *m, *u, *g, *t, *s))
            .collect();
        assert_eq!(seen, expected);
        Ok(())
    }
}
