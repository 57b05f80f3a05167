//! `shoal-oci-image`: writes a container image as an OCI image-layout archive
//! (a tar of `oci-layout`, `index.json` and `blobs/sha256/…`) with no Docker
//! engine, no registry and no base image to pull.
//!
//! `make images` builds static musl binaries of shoal-agent and shoal-operator
//! for amd64 and arm64 and calls `shoal-oci-image build` once per image, giving
//! the same contents `Dockerfile.agent` and `Dockerfile.operator` give on
//! `gcr.io/distroless/static-debian12:nonroot`: `/etc/passwd` and `/etc/group`
//! with root and `nonroot` (65532), the build machine's CA bundle at
//! `/etc/ssl/certs/ca-certificates.crt`, `/tmp` (1777), the binary in
//! `/usr/local/bin`, and the same user, entrypoint, command, environment,
//! ports and OCI labels. The Dockerfiles stay for people with Docker
//! (`make docker-images`); the archives are what CI and the local cluster use.
//!
//! The image has one gzip layer and is deterministic: entries are sorted, owned
//! by explicit uids and gids and dated SOURCE_DATE_EPOCH (the Makefile passes the
//! commit time), so the same inputs always give the same manifest digest.
//!
//! The archive's `index.json` names the image twice: `io.containerd.image.name`
//! (the full reference, which `ctr images import`, `k3s ctr images import` and
//! k3s's air-gap images folder use) and `org.opencontainers.image.ref.name`
//! (the tag, for OCI tools). `skopeo copy oci-archive:FILE docker://…` pushes it.
//!
//! ```text
//! shoal-oci-image build --output target/images/shoal-agent-amd64.tar \
//!   --reference ghcr.io/shoal-dev/shoal-agent:0.1.0 --arch amd64 \
//!   --accounts --tmp --ca-certificates /etc/ssl/certs/ca-certificates.crt \
//!   --binary target/x86_64-unknown-linux-musl/image/shoal-agent=/usr/local/bin/shoal-agent \
//!   --user 65532:65532 --entrypoint /usr/local/bin/shoal-agent \
//!   --env SHOAL_AGENT_LISTEN=0.0.0.0:8000 --port 8000 \
//!   --label org.opencontainers.image.title=shoal-agent
//! shoal-oci-image inspect target/images/*.tar
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use shoal_oci_image::archive::{inspect, write_archive};
use shoal_oci_image::image::{Arch, ImageSpec, build_layout};
use shoal_oci_image::layer::Layer;
use shoal_oci_image::{
    CA_CERTIFICATES_PATH, CopySpec, DirSpec, GROUP, NONROOT_ID, PASSWD, megabytes, parse_copy,
    parse_dir, parse_epoch, parse_key_value,
};

#[derive(Debug, Parser)]
#[command(
    name = "shoal-oci-image",
    version,
    about = "Writes deterministic OCI image-layout archives of static binaries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write one image with one layer.
    Build(Box<BuildArgs>),
    /// Check archives (digests, sizes) and print a table of their sizes.
    Inspect {
        /// Image-layout archives.
        #[arg(required = true)]
        archives: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// The archive to write (replaced atomically).
    #[arg(long)]
    output: PathBuf,
    /// The image's full reference, with a tag: ghcr.io/shoal-dev/shoal-agent:0.1.0.
    #[arg(long)]
    reference: String,
    /// The architecture the binaries were built for.
    #[arg(long, value_enum)]
    arch: Arch,
    /// A file to copy in as root-owned 0755: SRC=/DEST. Repeatable.
    #[arg(long = "binary", value_name = "SRC=/DEST", value_parser = parse_copy)]
    binaries: Vec<CopySpec>,
    /// Add /etc/passwd and /etc/group with root and nonroot (65532).
    #[arg(long)]
    accounts: bool,
    /// Add /tmp, mode 1777.
    #[arg(long)]
    tmp: bool,
    /// Copy this CA bundle to /etc/ssl/certs/ca-certificates.crt.
    #[arg(long, value_name = "PATH")]
    ca_certificates: Option<PathBuf>,
    /// A directory, mode 0755: /PATH (root-owned) or /PATH:UID:GID. Repeatable.
    #[arg(long = "dir", value_name = "/PATH[:UID:GID]", value_parser = parse_dir)]
    dirs: Vec<DirSpec>,
    /// User the container runs as, UID:GID.
    #[arg(long, default_value_t = format!("{NONROOT_ID}:{NONROOT_ID}"))]
    user: String,
    /// The entrypoint, one argument per flag.
    #[arg(long = "entrypoint", required = true)]
    entrypoint: Vec<String>,
    /// Default arguments (Cmd), one per flag.
    #[arg(long = "cmd")]
    cmd: Vec<String>,
    /// An environment variable KEY=VALUE (after PATH). Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// An exposed port, 8000 or 8000/tcp. Repeatable.
    #[arg(long = "port")]
    ports: Vec<String>,
    /// A label KEY=VALUE; org.opencontainers.image.created is added. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    labels: Vec<(String, String)>,
    /// Seconds since the Unix epoch that every file and the image are dated with.
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    source_date_epoch: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Build(args) => build(&args),
        Command::Inspect { archives } => print_table(&archives),
    }
}

/// Reads a whole input file, naming it in the error.
fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The layer `args` asks for.
fn layer(args: &BuildArgs) -> anyhow::Result<Layer> {
    let mut layer = Layer::new();
    if args.accounts {
        layer.add_file("/etc/passwd", PASSWD.as_bytes().to_vec(), 0o644, 0, 0)?;
        layer.add_file("/etc/group", GROUP.as_bytes().to_vec(), 0o644, 0, 0)?;
    }
    if args.tmp {
        layer.add_dir("/tmp", 0o1777, 0, 0)?;
    }
    if let Some(bundle) = &args.ca_certificates {
        let contents = read(bundle)?;
        if !String::from_utf8_lossy(&contents).contains("BEGIN CERTIFICATE") {
            bail!("{} holds no PEM certificate", bundle.display());
        }
        layer.add_file(CA_CERTIFICATES_PATH, contents, 0o644, 0, 0)?;
    }
    for dir in &args.dirs {
        layer.add_dir(&dir.path, 0o755, dir.uid, dir.gid)?;
    }
    for binary in &args.binaries {
        let contents = read(Path::new(&binary.source))?;
        layer.add_file(&binary.dest, contents, 0o755, 0, 0)?;
    }
    if layer.entries().is_empty() {
        bail!(
            "the image would be empty: give --binary, --dir, --accounts, --tmp or --ca-certificates"
        );
    }
    Ok(layer)
}

/// `build`: writes the archive and prints one line about it.
fn build(args: &BuildArgs) -> anyhow::Result<()> {
    let epoch = parse_epoch(&args.source_date_epoch)?;
    let spec = ImageSpec {
        reference: args.reference.clone(),
        arch: args.arch,
        user: args.user.clone(),
        entrypoint: args.entrypoint.clone(),
        cmd: args.cmd.clone(),
        env: args.env.clone(),
        ports: args.ports.clone(),
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        created: i64::try_from(epoch).context("SOURCE_DATE_EPOCH is too large")?,
    };
    let layer_tar = layer(args)?.to_tar(epoch)?;
    let layout = build_layout(&spec, &layer_tar)?;

    if let Some(parent) = args.output.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let partial = args.output.with_extension("tar.partial");
    let file =
        fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut out = write_archive(&layout, epoch, BufWriter::new(file))?;
    out.flush()
        .with_context(|| format!("writing {}", partial.display()))?;
    drop(out);
    fs::rename(&partial, &args.output).with_context(|| {
        format!(
            "renaming {} to {}",
            partial.display(),
            args.output.display()
        )
    })?;

    println!(
        "{}: {} {}, layer {} gzip ({} uncompressed), manifest {}",
        args.output.display(),
        args.reference,
        args.arch.oci_name(),
        megabytes(layout.layer_compressed_size),
        megabytes(layout.layer_uncompressed_size),
        layout.manifest.digest
    );
    Ok(())
}

/// `inspect`: checks each archive and prints one row per archive.
fn print_table(archives: &[PathBuf]) -> anyhow::Result<()> {
    let mut rows = vec![[
        "ARCHIVE".to_string(),
        "REFERENCE".to_string(),
        "PLATFORM".to_string(),
        "LAYER (GZIP)".to_string(),
        "UNCOMPRESSED".to_string(),
        "MANIFEST".to_string(),
    ]];
    for path in archives {
        let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let summary =
            inspect(BufReader::new(file)).with_context(|| format!("{}", path.display()))?;
        let name = path.file_name().unwrap_or(path.as_os_str());
        rows.push([
            name.to_string_lossy().into_owned(),
            summary.reference,
            summary.platform,
            megabytes(summary.layers_compressed),
            megabytes(summary.layers_uncompressed),
            summary.manifest_digest.chars().take(19).collect(),
        ]);
    }
    let mut widths = [0; 6];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}
