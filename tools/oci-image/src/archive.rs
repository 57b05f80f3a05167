//! The OCI image-layout archive: a tar of `oci-layout`, `index.json` and
//! `blobs/sha256/<hex>`, as `skopeo copy oci-archive:…`, `ctr images import`
//! and k3s's air-gap images folder read it. Also the reader behind `inspect`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use anyhow::{Context, bail};
use flate2::read::GzDecoder;

use crate::image::{ImageConfig, ImageLayout, Index, Manifest, sha256_digest};
use crate::layer::{self, Owner};

/// The bytes of the `oci-layout` file.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes `layout` as a tar to `out`, every entry owned by root with
/// modification time `mtime`, in sorted order.
pub fn write_archive<W: Write>(layout: &ImageLayout, mtime: u64, out: W) -> anyhow::Result<W> {
    let mut builder = tar::Builder::new(out);
    let add_file = |builder: &mut tar::Builder<W>, path: &str, bytes: &[u8]| {
        let size = u64::try_from(bytes.len()).context("blob too large")?;
        let header = layer::header(tar::EntryType::Regular, Owner::root(0o644), size, mtime);
        layer::append(builder, header, path, bytes)
    };
    // "blobs" < "index.json" < "oci-layout": sorted by path.
    for path in ["blobs", "blobs/sha256"] {
        let header = layer::header(tar::EntryType::Directory, Owner::root(0o755), 0, mtime);
        layer::append(&mut builder, header, path, io::empty())?;
    }
    for (name, bytes) in &layout.blobs {
        add_file(&mut builder, &format!("blobs/sha256/{name}"), bytes)?;
    }
    add_file(&mut builder, "index.json", &layout.index_json)?;
    add_file(&mut builder, "oci-layout", OCI_LAYOUT)?;
    builder.into_inner().context("finishing the archive")
}

/// What `inspect` reports about one archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The `io.containerd.image.name` annotation.
    pub reference: String,
    /// `linux/amd64`, `linux/arm64/v8`.
    pub platform: String,
    /// The manifest's digest.
    pub manifest_digest: String,
    /// Bytes of the compressed layers.
    pub layers_compressed: u64,
    /// Bytes of the layers once decompressed.
    pub layers_uncompressed: u64,
}

/// Reads an image-layout archive, checks that every blob matches its digest
/// and that each descriptor the manifest has points at a blob of that size,
/// and summarizes its one image.
pub fn inspect<R: Read>(archive: R) -> anyhow::Result<Summary> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut archive = tar::Archive::new(archive);
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {path}"))?;
        files.insert(path.trim_start_matches("./").to_string(), bytes);
    }
    if files.get("oci-layout").map(Vec::as_slice) != Some(OCI_LAYOUT) {
        bail!("the archive has no oci-layout file of version 1.0.0");
    }
    for (path, bytes) in &files {
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let digest = sha256_digest(bytes);
            if digest != format!("sha256:{hex}") {
                bail!("blob {path} does not match its name: its digest is {digest}");
            }
        }
    }
    let blob = |digest: &str, size: u64| -> anyhow::Result<&Vec<u8>> {
        let hex = digest
            .strip_prefix("sha256:")
            .with_context(|| format!("digest {digest:?} is not sha256"))?;
        let bytes = files
            .get(&format!("blobs/sha256/{hex}"))
            .with_context(|| format!("blob {digest} is missing"))?;
        if u64::try_from(bytes.len())? != size {
            bail!(
                "blob {digest} has {} bytes, its descriptor says {size}",
                bytes.len()
            );
        }
        Ok(bytes)
    };

    let index_json = files.get("index.json").context("index.json is missing")?;
    let index: Index = serde_json::from_slice(index_json).context("parsing index.json")?;
    let [descriptor] = index.manifests.as_slice() else {
        bail!(
            "index.json has {} manifests, expected 1",
            index.manifests.len()
        );
    };
    let manifest: Manifest = serde_json::from_slice(blob(&descriptor.digest, descriptor.size)?)
        .context("parsing the manifest")?;
    let config: ImageConfig =
        serde_json::from_slice(blob(&manifest.config.digest, manifest.config.size)?)
            .context("parsing the image config")?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        bail!("the config lists a different number of layers than the manifest");
    }
    let mut layers_compressed = 0;
    let mut layers_uncompressed = 0;
    for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let compressed = blob(&layer.digest, layer.size)?;
        let mut tar = Vec::new();
        GzDecoder::new(compressed.as_slice())
            .read_to_end(&mut tar)
            .with_context(|| format!("decompressing layer {}", layer.digest))?;
        if &sha256_digest(&tar) != diff_id {
            bail!("layer {} does not decompress to {diff_id}", layer.digest);
        }
        layers_compressed += layer.size;
        layers_uncompressed += u64::try_from(tar.len())?;
    }
    let reference = descriptor
        .annotations
        .get(crate::image::CONTAINERD_NAME_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let mut platform = format!("{}/{}", config.os, config.architecture);
    if let Some(variant) = &config.variant {
        platform = format!("{platform}/{variant}");
    }
    Ok(Summary {
        reference,
        platform,
        manifest_digest: descriptor.digest.clone(),
        layers_compressed,
        layers_uncompressed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Arch, ImageSpec, build_layout};
    use crate::layer::Layer;

    fn layout() -> anyhow::Result<ImageLayout> {
        let mut layer = Layer::new();
        layer.add_file("/pause", b"\x7fELF".to_vec(), 0o755, 0, 0)?;
        let spec = ImageSpec {
            reference: "localhost/shoal/pause:3.10.1".to_string(),
            arch: Arch::Amd64,
            user: "65535:65535".to_string(),
            entrypoint: vec!["/pause".to_string()],
            cmd: Vec::new(),
            env: Vec::new(),
            ports: Vec::new(),
            labels: BTreeMap::new(),
            created: 1_700_000_000,
        };
        build_layout(&spec, &layer.to_tar(1_700_000_000)?)
    }

    #[test]
    fn archive_is_deterministic_and_reads_back() -> anyhow::Result<()> {
        let layout = layout()?;
        let first = write_archive(&layout, 1_700_000_000, Vec::new())?;
        let second = write_archive(&layout, 1_700_000_000, Vec::new())?;
        assert_eq!(first, second);

        let names: Vec<String> = tar::Archive::new(first.as_slice())
            .entries()?
            .map(|entry| Ok(String::from_utf8_lossy(&entry?.path_bytes()).into_owned()))
            .collect::<io::Result<_>>()?;
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(names.first().map(String::as_str), Some("blobs"));
        assert_eq!(names.last().map(String::as_str), Some("oci-layout"));

        let summary = inspect(first.as_slice())?;
        assert_eq!(summary.reference, "localhost/shoal/pause:3.10.1");
        assert_eq!(summary.platform, "linux/amd64");
        assert_eq!(summary.manifest_digest, layout.manifest.digest);
        assert_eq!(summary.layers_compressed, layout.layer_compressed_size);
        assert_eq!(summary.layers_uncompressed, layout.layer_uncompressed_size);
        Ok(())
    }

    #[test]
    fn inspect_rejects_a_corrupt_blob() -> anyhow::Result<()> {
        let mut layout = layout()?;
        for bytes in layout.blobs.values_mut() {
            if bytes.first() == Some(&b'{') {
                bytes.push(b' ');
            }
        }
        let archive = write_archive(&layout, 0, Vec::new())?;
        let error = inspect(archive.as_slice())
            .err()
            .context("expected an error")?;
        assert!(
            error.to_string().contains("does not match its name"),
            "{error}"
        );
        Ok(())
    }
}
