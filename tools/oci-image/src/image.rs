//! The JSON documents of an OCI image (config, manifest, index) and the blobs
//! they describe.
//!
//! Every document is a struct with fixed field order, and every map is a
//! `BTreeMap`, so the JSON bytes (and so the digests) depend only on the inputs,
//! never on serde_json's features or on hash order.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, bail};
use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Media type of an image index (`index.json`).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzip-compressed layer.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation containerd (`ctr images import`, k3s) names an imported image by.
pub const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";
/// The OCI annotation for the tag of a manifest in an image layout.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The OCI label for the image's creation time.
pub const CREATED_LABEL: &str = "org.opencontainers.image.created";
/// `PATH` in every image, the same as Docker's default and distroless's.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A CPU architecture the images are built for, with its OCI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// x86-64.
    Amd64,
    /// 64-bit Arm (ARMv8).
    Arm64,
}

impl Arch {
    /// The OCI `architecture` value.
    pub fn oci_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The OCI `variant` value, as Docker writes it for arm64.
    pub fn variant(self) -> Option<&'static str> {
        match self {
            Arch::Amd64 => None,
            Arch::Arm64 => Some("v8"),
        }
    }
}

/// What the image runs and how it is described: everything of the config but the layer.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The full reference, e.g. `ghcr.io/shoal-dev/shoal-agent:0.1.0`.
    pub reference: String,
    /// The architecture the binaries were built for.
    pub arch: Arch,
    /// `uid:gid` the container runs as.
    pub user: String,
    /// The command, e.g. `["/usr/local/bin/shoal-agent"]`.
    pub entrypoint: Vec<String>,
    /// Default arguments to the entrypoint (may be empty).
    pub cmd: Vec<String>,
    /// `KEY=VALUE` environment variables, after `PATH`.
    pub env: Vec<String>,
    /// Ports, `8000` or `8000/tcp`.
    pub ports: Vec<String>,
    /// Labels; `org.opencontainers.image.created` is added from `created`.
    pub labels: BTreeMap<String, String>,
    /// Creation time, seconds since the Unix epoch (SOURCE_DATE_EPOCH).
    pub created: i64,
}

/// A JSON object with no members, for `ExposedPorts`' values.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Empty {}

/// The part of the image config a container runtime runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `uid:gid`.
    pub user: String,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// The command.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// `8000/tcp` and so on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, Empty>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Working directory.
    pub working_dir: String,
}

/// The layers of the root filesystem, by uncompressed digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `sha256:…` of each uncompressed layer tar.
    pub diff_ids: Vec<String>,
}

/// One step of the image's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    /// RFC 3339 time.
    pub created: String,
    /// What made the layer.
    pub created_by: String,
}

/// The image config (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageConfig {
    /// RFC 3339 time.
    pub created: String,
    /// `amd64`, `arm64`.
    pub architecture: String,
    /// Always `linux`.
    pub os: String,
    /// `v8` on arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// What to run.
    pub config: RunConfig,
    /// The layers.
    pub rootfs: RootFs,
    /// How they were made.
    pub history: Vec<History>,
}

/// A content descriptor: a blob's media type, digest and size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// The platform of a manifest, in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (the image name and tag, in an index).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The platform of a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// `amd64`, `arm64`.
    pub architecture: String,
    /// Always `linux`.
    pub os: String,
    /// `v8` on arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (`application/vnd.oci.image.manifest.v1+json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`MANIFEST_MEDIA_TYPE`].
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs.
    pub layers: Vec<Descriptor>,
}

/// An image index (`index.json` of the layout).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// [`INDEX_MEDIA_TYPE`].
    pub media_type: String,
    /// The images.
    pub manifests: Vec<Descriptor>,
}

/// The contents of an OCI image layout: `index.json` and the blobs it refers to.
#[derive(Debug, Clone)]
pub struct ImageLayout {
    /// The bytes of `index.json`.
    pub index_json: Vec<u8>,
    /// The blobs, by hex sha256: the layer, the config and the manifest.
    pub blobs: BTreeMap<String, Vec<u8>>,
    /// The manifest's descriptor (as in `index.json`).
    pub manifest: Descriptor,
    /// The size of the uncompressed layer tar.
    pub layer_uncompressed_size: u64,
    /// The size of the gzip-compressed layer.
    pub layer_compressed_size: u64,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The tag of a reference: `0.1.0` of `ghcr.io/shoal-dev/shoal-agent:0.1.0`.
/// A reference without a tag, or with a digest, is an error.
pub fn tag_of(reference: &str) -> anyhow::Result<&str> {
    if reference.contains('@') {
        bail!("reference {reference:?} has a digest; give a tag instead");
    }
    let name_start = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[name_start..].rsplit_once(':') {
        Some((name, tag)) if !name.is_empty() && !tag.is_empty() => Ok(tag),
        _ => bail!("reference {reference:?} has no tag (expected e.g. ghcr.io/org/name:1.0)"),
    }
}

/// `8000` or `8000/udp` as `8000/tcp` or `8000/udp`.
pub fn exposed_port(port: &str) -> anyhow::Result<String> {
    let (number, protocol) = port.split_once('/').unwrap_or((port, "tcp"));
    let number: u16 = number
        .parse()
        .with_context(|| format!("port {port:?} is not a port number"))?;
    if number == 0 || !matches!(protocol, "tcp" | "udp" | "sctp") {
        bail!("port {port:?}: expected 1-65535, optionally /tcp, /udp or /sctp");
    }
    Ok(format!("{number}/{protocol}"))
}

/// RFC 3339 UTC time of `seconds` since the Unix epoch, e.g. `2026-04-14T10:00:00Z`.
pub fn rfc3339(seconds: i64) -> anyhow::Result<String> {
    let time = chrono::DateTime::from_timestamp(seconds, 0)
        .with_context(|| format!("{seconds} is out of range as a time"))?;
    Ok(time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Gzip of `data` at the best compression, with no file name and mtime 0 in
/// the gzip header, so it depends only on `data`.
pub fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    encoder.write_all(data).context("compressing the layer")?;
    encoder.finish().context("compressing the layer")
}

/// A descriptor of `bytes` with no platform or annotations.
fn descriptor(media_type: &str, bytes: &[u8]) -> anyhow::Result<Descriptor> {
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest: sha256_digest(bytes),
        size: u64::try_from(bytes.len()).context("blob too large")?,
        platform: None,
        annotations: BTreeMap::new(),
    })
}

/// The hex part of a `sha256:` digest, the blob's file name in the layout.
fn blob_name(digest: &str) -> anyhow::Result<String> {
    match digest.strip_prefix("sha256:") {
        Some(hex) => Ok(hex.to_string()),
        None => bail!("digest {digest:?} is not sha256"),
    }
}

/// The image config of `spec` over one layer whose uncompressed digest is `diff_id`.
pub fn image_config(spec: &ImageSpec, diff_id: String) -> anyhow::Result<ImageConfig> {
    let created = rfc3339(spec.created)?;
    let mut env = vec![DEFAULT_PATH.to_string()];
    for variable in &spec.env {
        if !variable.contains('=') || variable.starts_with('=') {
            bail!("environment variable {variable:?} is not KEY=VALUE");
        }
        if variable.starts_with("PATH=") {
            bail!("PATH is set by the image writer itself ({DEFAULT_PATH})");
        }
        env.push(variable.clone());
    }
    let mut exposed_ports = BTreeMap::new();
    for port in &spec.ports {
        exposed_ports.insert(exposed_port(port)?, Empty {});
    }
    let mut labels = spec.labels.clone();
    labels.insert(CREATED_LABEL.to_string(), created.clone());
    if spec.entrypoint.is_empty() {
        bail!("the image needs an entrypoint");
    }
    Ok(ImageConfig {
        created: created.clone(),
        architecture: spec.arch.oci_name().to_string(),
        os: "linux".to_string(),
        variant: spec.arch.variant().map(str::to_string),
        config: RunConfig {
            user: spec.user.clone(),
            env,
            entrypoint: spec.entrypoint.clone(),
            cmd: spec.cmd.clone(),
            exposed_ports,
            labels,
            working_dir: "/".to_string(),
        },
        rootfs: RootFs {
            kind: "layers".to_string(),
            diff_ids: vec![diff_id],
        },
        history: vec![History {
            created,
            created_by: "shoal-oci-image".to_string(),
        }],
    })
}

/// The layout of an image of `spec` with the one layer `layer_tar` (uncompressed).
pub fn build_layout(spec: &ImageSpec, layer_tar: &[u8]) -> anyhow::Result<ImageLayout> {
    let tag = tag_of(&spec.reference)?.to_string();
    let layer_gzip = gzip(layer_tar)?;
    let layer = descriptor(LAYER_MEDIA_TYPE, &layer_gzip)?;

    let config = image_config(spec, sha256_digest(layer_tar))?;
    let config_json = serde_json::to_vec(&config).context("encoding the image config")?;
    let config_descriptor = descriptor(CONFIG_MEDIA_TYPE, &config_json)?;

    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.to_string(),
        config: config_descriptor.clone(),
        layers: vec![layer.clone()],
    };
    let manifest_json = serde_json::to_vec(&manifest).context("encoding the manifest")?;
    let mut manifest_descriptor = descriptor(MANIFEST_MEDIA_TYPE, &manifest_json)?;
    manifest_descriptor.platform = Some(Platform {
        architecture: config.architecture.clone(),
        os: config.os.clone(),
        variant: config.variant.clone(),
    });
    manifest_descriptor.annotations = BTreeMap::from([
        (
            CONTAINERD_NAME_ANNOTATION.to_string(),
            spec.reference.clone(),
        ),
        (REF_NAME_ANNOTATION.to_string(), tag),
    ]);

    let index = Index {
        schema_version: 2,
        media_type: INDEX_MEDIA_TYPE.to_string(),
        manifests: vec![manifest_descriptor.clone()],
    };
    let index_json = serde_json::to_vec(&index).context("encoding index.json")?;

    let mut blobs = BTreeMap::new();
    blobs.insert(blob_name(&layer.digest)?, layer_gzip);
    blobs.insert(blob_name(&config_descriptor.digest)?, config_json);
    blobs.insert(blob_name(&manifest_descriptor.digest)?, manifest_json);
    Ok(ImageLayout {
        index_json,
        blobs,
        manifest: manifest_descriptor,
        layer_uncompressed_size: u64::try_from(layer_tar.len()).context("layer too large")?,
        layer_compressed_size: layer.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        ImageSpec {
            reference: "ghcr.io/shoal-dev/shoal-operator:0.1.0".to_string(),
            arch: Arch::Arm64,
            user: "65532:65532".to_string(),
            entrypoint: vec!["/usr/local/bin/shoal-operator".to_string()],
            cmd: vec!["run".to_string()],
            env: vec!["SHOAL_METRICS_ADDR=0.0.0.0:8080".to_string()],
            ports: vec!["8443".to_string(), "8080/tcp".to_string()],
            labels: BTreeMap::from([(
                "org.opencontainers.image.title".to_string(),
                "shoal-operator".to_string(),
            )]),
            created: 1_776_160_800,
        }
    }

    #[test]
    fn tag_of_takes_the_tag_after_the_last_slash() -> anyhow::Result<()> {
        assert_eq!(tag_of("ghcr.io/shoal-dev/shoal-agent:0.1.0")?, "0.1.0");
        assert_eq!(tag_of("localhost:5000/pause:3.10.1")?, "3.10.1");
        assert_eq!(tag_of("pause:3.10.1")?, "3.10.1");
        assert!(tag_of("localhost:5000/pause").is_err());
        assert!(tag_of("pause:").is_err());
        assert!(tag_of("pause@sha256:00").is_err());
        Ok(())
    }

    #[test]
    fn ports_default_to_tcp() -> anyhow::Result<()> {
        assert_eq!(exposed_port("8000")?, "8000/tcp");
        assert_eq!(exposed_port("53/udp")?, "53/udp");
        assert!(exposed_port("0").is_err());
        assert!(exposed_port("http").is_err());
        assert!(exposed_port("80/icmp").is_err());
        Ok(())
    }

    #[test]
    fn rfc3339_is_utc_seconds() -> anyhow::Result<()> {
        assert_eq!(rfc3339(0)?, "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_776_160_800)?, "2026-04-14T10:00:00Z");
        Ok(())
    }

    #[test]
    fn config_has_run_settings_and_created_label() -> anyhow::Result<()> {
        let config = image_config(&spec(), "sha256:ab".to_string())?;
        let json = serde_json::to_value(&config)?;
        assert_eq!(json["architecture"], "arm64");
        assert_eq!(json["variant"], "v8");
        assert_eq!(json["os"], "linux");
        assert_eq!(json["config"]["User"], "65532:65532");
        assert_eq!(
            json["config"]["Entrypoint"],
            serde_json::json!(["/usr/local/bin/shoal-operator"])
        );
        assert_eq!(json["config"]["Cmd"], serde_json::json!(["run"]));
        assert_eq!(
            json["config"]["Env"],
            serde_json::json!([DEFAULT_PATH, "SHOAL_METRICS_ADDR=0.0.0.0:8080"])
        );
        assert_eq!(
            json["config"]["ExposedPorts"],
            serde_json::json!({"8080/tcp": {}, "8443/tcp": {}})
        );
        assert_eq!(
            json["config"]["Labels"][CREATED_LABEL],
            "2026-04-14T10:00:00Z"
        );
        assert_eq!(json["rootfs"]["diff_ids"], serde_json::json!(["sha256:ab"]));
        Ok(())
    }

    #[test]
    fn config_rejects_bad_env_and_missing_entrypoint() {
        let mut bad_env = spec();
        bad_env.env = vec!["NOVALUE".to_string()];
        assert!(image_config(&bad_env, String::new()).is_err());
        let mut path = spec();
        path.env = vec!["PATH=/bin".to_string()];
        assert!(image_config(&path, String::new()).is_err());
        let mut no_entrypoint = spec();
        no_entrypoint.entrypoint.clear();
        assert!(image_config(&no_entrypoint, String::new()).is_err());
    }

    #[test]
    fn layout_is_deterministic_and_consistent() -> anyhow::Result<()> {
        let layer = b"not really a tar, the layout does not look inside".to_vec();
        let first = build_layout(&spec(), &layer)?;
        let second = build_layout(&spec(), &layer)?;
        assert_eq!(first.index_json, second.index_json);
        assert_eq!(first.blobs, second.blobs);

        let index: Index = serde_json::from_slice(&first.index_json)?;
        assert_eq!(index.manifests, vec![first.manifest.clone()]);
        let annotations = &first.manifest.annotations;
        assert_eq!(
            annotations[CONTAINERD_NAME_ANNOTATION],
            "ghcr.io/shoal-dev/shoal-operator:0.1.0"
        );
        assert_eq!(annotations[REF_NAME_ANNOTATION], "0.1.0");

        // Every descriptor names a blob of that size and digest.
        let manifest_bytes = &first.blobs[blob_name(&first.manifest.digest)?.as_str()];
        let manifest: Manifest = serde_json::from_slice(manifest_bytes)?;
        for descriptor in [&first.manifest, &manifest.config, &manifest.layers[0]] {
            let blob = &first.blobs[blob_name(&descriptor.digest)?.as_str()];
            assert_eq!(sha256_digest(blob), descriptor.digest);
            assert_eq!(u64::try_from(blob.len())?, descriptor.size);
        }
        assert_eq!(first.blobs.len(), 3);

        // The config's diff_id is the digest of the uncompressed layer.
        let config_bytes = &first.blobs[blob_name(&manifest.config.digest)?.as_str()];
        let config: ImageConfig = serde_json::from_slice(config_bytes)?;
        assert_eq!(config.rootfs.diff_ids, vec![sha256_digest(&layer)]);
        Ok(())
    }
}
