//! The local control plane of `make cluster-up` as the tests see it: the kubeconfig,
//! a client that checks it talks to this machine, Shoal's CRDs installed once per
//! test binary, and one namespace of its own per test.

use crate::wait::wait_for;
use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::OnceCell;

/// Field manager of everything the tests server-side apply.
pub const FIELD_MANAGER: &str = "shoal-tests";
/// How long one call to the API server (or to a process's HTTP endpoint) may take.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The kubeconfig the tests use: `$KUBECONFIG` (the Makefile points it at the local
/// control plane), else the one `make cluster-up` writes. Never `~/.kube/config`:
/// the tests create Nodes and CRDs, which do not belong in somebody's real cluster.
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => workspace_dir().join("target/cluster/kubeconfig"),
    }
}

/// The API server's address (host:port) from the kubeconfig the tests use.
pub fn api_server_addr() -> anyhow::Result<std::net::SocketAddr> {
    let server = kubeconfig_server()?;
    let authority = server
        .strip_prefix("https://")
        .with_context(|| format!("the kubeconfig's server {server} is not https://"))?;
    authority
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("the kubeconfig's server {server} is not an IP address and port"))
}

/// Writes to `path` a copy of the tests' kubeconfig whose server is `addr` (same
/// credentials and CA), e.g. a [`crate::stall_proxy::StallProxy`] in front of the
/// API server: the certificate names 127.0.0.1, which the proxy's address shares.
pub fn write_kubeconfig_via(addr: std::net::SocketAddr, path: &Path) -> anyhow::Result<()> {
    let server = kubeconfig_server()?;
    let text = std::fs::read_to_string(kubeconfig_path())?;
    std::fs::write(path, text.replace(&server, &format!("https://{addr}")))?;
    Ok(())
}

fn kubeconfig_server() -> anyhow::Result<String> {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
    kubeconfig
        .clusters
        .iter()
        .find_map(|named| named.cluster.as_ref()?.server.clone())
        .with_context(|| format!("the kubeconfig {} names no server", path.display()))
}

/// The workspace root (the directory of the root Cargo.toml).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// A client for the local control plane, after checking that it answers.
pub async fn client() -> anyhow::Result<Client> {
    let path = kubeconfig_path();
    let hint = "start the local control plane with `make cluster-up` (it writes target/cluster/kubeconfig)";
    let kubeconfig = Kubeconfig::read_from(&path)
        .with_context(|| format!("cannot read the kubeconfig {}; {hint}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("the kubeconfig {} is not usable; {hint}", path.display()))?;
    let host = config.cluster_url.host().unwrap_or_default().to_string();
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]") {
        bail!(
            "KUBECONFIG={} points at {}, not a control plane on this machine; the tests create \
             Nodes and CRDs, so they only run against the local one: {hint}",
            path.display(),
            config.cluster_url
        );
    }
    let client = Client::try_from(config).context("cannot build a Kubernetes client")?;
    match tokio::time::timeout(API_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(err)) => bail!(
            "the Kubernetes API server in {} does not answer ({err}); {hint}",
            path.display()
        ),
        Err(_) => bail!(
            "the Kubernetes API server in {} did not answer within {API_TIMEOUT:?}; {hint}",
            path.display()
        ),
    }
}

static CRDS_INSTALLED: OnceCell<()> = OnceCell::const_new();

/// Server-side applies `shoal_api::crds()` and waits until each is Established.
/// Idempotent; each test binary does the work once.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    CRDS_INSTALLED
        .get_or_try_init(|| apply_crds(client))
        .await?;
    Ok(())
}

async fn apply_crds(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in shoal_api::crds() {
        let name = crd
            .metadata
            .name
            .clone()
            .context("a CRD from shoal_api::crds() has no name")?;
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("the API server refused CRD {name}"))?;
        names.push(name);
    }
    for name in names {
        wait_for(&api, &name, Duration::from_secs(60), |crd| {
            crd.status
                .as_ref()
                .and_then(|status| status.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        })
        .await?;
    }
    Ok(())
}

/// A namespace of its own for one test. Call `delete()` at the end; a test that
/// fails leaves its namespace behind for inspection and says so.
pub struct TestNamespace {
    client: Client,
    name: String,
    deleted: bool,
}

impl TestNamespace {
    /// Creates the namespace `<prefix>-<random suffix>`.
    pub async fn create(client: &Client, prefix: &str) -> anyhow::Result<TestNamespace> {
        let name = unique_name(prefix);
        let namespace = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "shoal.dev/test".to_string(),
                    "true".to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("cannot create namespace {name}"))?;
        Ok(TestNamespace {
            client: client.clone(),
            name,
            deleted: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts deleting the namespace (the namespace controller finishes it).
    pub async fn delete(mut self) -> anyhow::Result<()> {
        self.deleted = true;
        Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await
            .with_context(|| format!("cannot delete namespace {}", self.name))?;
        Ok(())
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if !self.deleted {
            eprintln!(
                "namespace {0} was left for inspection; remove it with `kubectl delete namespace {0}`",
                self.name
            );
        }
    }
}

/// `<prefix>-<8 hex digits>`, different on every call.
pub fn unique_name(prefix: &str) -> String {
    // RandomState is seeded randomly per process and changes on every call: enough
    // to keep concurrent tests and repeated runs apart without a rand dependency.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{prefix}-{:08x}", hasher.finish() as u32)
}
