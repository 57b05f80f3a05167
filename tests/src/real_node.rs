//! The real node of `make node-up` (a kubelet with containerd, runc and CNI plugins
//! beside the kwok nodes, its pods on a bridge of this machine) and the chart
//! installed on it with helm the way the README's "Install on k3s" tells users to:
//! what `tests/tests/real_node.rs` drives. Nothing here talks to any address but
//! 127.0.0.1 and the node's bridge.

use crate::cluster::workspace_dir;
use crate::credentials::certificate_for;
use crate::wait::{wait_for, wait_until_gone};
use anyhow::{Context as _, bail, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The namespace the chart is installed into, as in the README.
pub const RELEASE_NAMESPACE: &str = "shoal-system";
/// The Helm release name, as in the README; the chart names its objects
/// `shoal-operator` after it.
pub const RELEASE: &str = "shoal";
/// The operator's Deployment and Service.
pub const OPERATOR: &str = "shoal-operator";
/// The fixed ClusterIP of the operator's Service (`service.clusterIP`): the agents
/// running as local processes beside the kwok nodes resolve no cluster DNS, so they
/// dial this address, which the TLS certificate names too.
pub const OPERATOR_CLUSTER_IP: &str = "10.0.0.200";
/// The port of the operator's agent API (the chart's `agentApi.port`).
pub const AGENT_API_PORT: u16 = 8443;
/// How long the real-node helpers wait for pods, releases and the kubelet.
pub const NODE_WAIT: Duration = Duration::from_secs(180);

/// The real node, as `tests/cluster/node-up.sh` describes it in `target/node/node.env`.
#[derive(Debug, Clone)]
pub struct RealNode {
    /// The Node's name (`shoal-node-0`).
    pub name: String,
    /// The node's InternalIP: the gateway address of its pod bridge.
    pub ip: String,
    /// The label `key=value` the node carries, for EdgePools that select it.
    pub label: (String, String),
    /// `target/node`: PID files (`pids/`) and logs (`logs/`) of the node's processes.
    pub state: PathBuf,
    /// containerd's socket.
    pub containerd_address: String,
    /// The kubelet's `--root-dir` (pods' volumes are under `pods/<uid>/volumes`).
    pub kubelet_root: PathBuf,
}

impl RealNode {
    /// Reads `target/node/node.env` (written by `make node-up`), then waits until the
    /// Node is Ready.
    pub async fn up(client: &Client) -> anyhow::Result<RealNode> {
        let state = workspace_dir().join("target/node");
        let path = state.join("node.env");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: start the real node with `make node-up` (it needs root and containerd)",
                path.display()
            )
        })?;
        let env: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.trim(), value.trim().trim_matches('"')))
            .collect();
        let get = |key: &str| -> anyhow::Result<String> {
            env.get(key)
                .map(|value| value.to_string())
                .with_context(|| format!("{} has no {key}", path.display()))
        };
        let label = get("NODE_LABEL")?;
        let (key, value) = label
            .split_once('=')
            .with_context(|| format!("NODE_LABEL in {} is not key=value", path.display()))?;
        let node = RealNode {
            name: get("NODE_NAME")?,
            ip: get("NODE_IP")?,
            label: (key.to_string(), value.to_string()),
            state,
            containerd_address: get("CONTAINERD_ADDRESS")?,
            kubelet_root: PathBuf::from(get("KUBELET_ROOT")?),
        };
        wait_for(
            &Api::<Node>::all(client.clone()),
            &node.name,
            NODE_WAIT,
            |n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            },
        )
        .await
        .with_context(|| format!("node {} should be Ready (make node-up)", node.name))?;
        Ok(node)
    }

    /// The file the kubelet projected into a volume of the pod `pod_uid`.
    pub fn projected_file(&self, pod_uid: &str, volume: &str, file: &str) -> PathBuf {
        self.kubelet_root
            .join("pods")
            .join(pod_uid)
            .join("volumes/kubernetes.io~projected")
            .join(volume)
            .join(file)
    }

    /// `ctr` against the node's containerd, in the kubelet's namespace `k8s.io`.
    pub async fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::process::Command::new("ctr")
            .args([
                "--address",
                &self.containerd_address,
                "--namespace",
                "k8s.io",
            ])
            .args(args)
            .output()
            .await
            .context("cannot run ctr (Debian package containerd)")?;
        ensure!(
            output.status.success(),
            "ctr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Kills a container's process with SIGKILL, as the kernel's OOM killer or a
    /// crash would; the kubelet notices and restarts it.
    pub async fn kill_container(&self, container_id: &str) -> anyhow::Result<()> {
        self.ctr(&["tasks", "kill", "--signal", "SIGKILL", container_id])
            .await
            .map(|_| ())
    }

    /// Stops the node's containerd (SIGTERM) and starts it again with the same
    /// command line; returns how long it was away (until `ctr version` answered).
    /// The containers' shims keep running meanwhile, as on any containerd restart.
    pub async fn restart_containerd(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let args =
            crate::recorded_processes::stop_recorded_process(&self.state, "containerd").await?;
        crate::recorded_processes::start_recorded_process(&self.state, "containerd", &args)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.ctr(&["version"]).await.is_err() {
            ensure!(
                Instant::now() < deadline,
                "containerd did not answer within 60 s of its restart; see {}",
                self.state.join("logs/containerd.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(started.elapsed())
    }
}

/// The pod's `containerd://<id>` of the container `name`, and its restart count.
pub fn container_state(pod: &Pod, name: &str) -> Option<(String, i32)> {
    let status = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)?;
    let id = status
        .container_id
        .as_ref()?
        .strip_prefix("containerd://")?;
    Some((id.to_string(), status.restart_count))
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The chart installed with `helm install` into [`RELEASE_NAMESPACE`]: the operator
/// from its image, its artifact store on a hostPath PersistentVolume the test makes,
/// its TLS Secret made the way cert-manager makes one (`tls.crt`, `tls.key`,
/// `ca.crt`), leader election on.
pub struct Release {
    client: Client,
    certificates: tempfile::TempDir,
    volume: String,
    volume_dir: PathBuf,
}

impl Release {
    /// Makes the namespace, the TLS Secret and the PersistentVolume, runs `helm
    /// install --wait` and returns once the operator pod is Ready, with the time
    /// `helm install` took to get there.
    pub async fn install(client: &Client) -> anyhow::Result<(Release, Duration)> {
        let namespaces = Api::<Namespace>::all(client.clone());
        if namespaces.get_opt(RELEASE_NAMESPACE).await?.is_some() {
            bail!(
                "namespace {RELEASE_NAMESPACE} exists already (a failed run?): `helm uninstall {RELEASE} -n {RELEASE_NAMESPACE}; kubectl delete namespace {RELEASE_NAMESPACE}`"
            );
        }
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": { "name": RELEASE_NAMESPACE },
        }))?;
        namespaces
            .create(&PostParams::default(), &namespace)
            .await?;

        let certificates = tempfile::Builder::new()
            .prefix("shoal-release-")
            .tempdir()?;
        let service = format!("{OPERATOR}.{RELEASE_NAMESPACE}.svc");
        let tls = certificate_for(
            certificates.path(),
            &format!("DNS:{service},DNS:{service}.cluster.local,IP:{OPERATOR_CLUSTER_IP}"),
        )?;
        let read =
            |path: &Path| -> anyhow::Result<ByteString> { Ok(ByteString(std::fs::read(path)?)) };
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("{OPERATOR}-tls")),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), read(&tls.cert)?),
                ("tls.key".to_string(), read(&tls.key)?),
                ("ca.crt".to_string(), read(&tls.ca)?),
            ])),
            ..Default::default()
        };
        Api::<Secret>::namespaced(client.clone(), RELEASE_NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await?;

        // The artifact store: a hostPath PersistentVolume for the chart's claim (on
        // k3s, local-path provisions one). The operator runs as 65532.
        let volume = format!("{RELEASE_NAMESPACE}-artifacts");
        let volume_dir = workspace_dir().join("target/node/volumes").join(&volume);
        let _ = std::fs::remove_dir_all(&volume_dir);
        std::fs::create_dir_all(&volume_dir)?;
        std::os::unix::fs::chown(&volume_dir, Some(65532), Some(65532))
            .with_context(|| format!("chown 65532 {} (run as root)", volume_dir.display()))?;
        let persistent_volume: PersistentVolume = serde_json::from_value(json!({
            "metadata": { "name": volume },
            "spec": {
                "capacity": { "storage": "10Gi" },
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": { "path": volume_dir, "type": "Directory" },
                "claimRef": { "namespace": RELEASE_NAMESPACE, "name": format!("{OPERATOR}-artifacts") },
            },
        }))?;
        let volumes = Api::<PersistentVolume>::all(client.clone());
        let _ = volumes.delete(&volume, &DeleteParams::default()).await;
        wait_until_gone(&volumes, &volume, Duration::from_secs(30)).await?;
        volumes
            .create(&PostParams::default(), &persistent_volume)
            .await?;

        let release = Release {
            client: client.clone(),
            certificates,
            volume,
            volume_dir,
        };
        let started = Instant::now();
        let chart = workspace_dir().join("charts/shoal");
        let output = tokio::process::Command::new("helm")
            .args(["install", RELEASE])
            .arg(&chart)
            .args([
                "--namespace",
                RELEASE_NAMESPACE,
                "--wait",
                "--timeout",
                "5m",
            ])
            .args(["--set", "agentApi.tls.caKey=ca.crt"])
            .args(["--set", &format!("service.clusterIP={OPERATOR_CLUSTER_IP}")])
            .args(["--set", "logLevel=info\\,shoal_operator=debug"])
            .output()
            .await
            .context("cannot run helm (make cluster-build builds it)")?;
        if !output.status.success() {
            bail!(
                "helm install failed: {}{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                release.describe().await
            );
        }
        release.wait_operator_ready(None).await?;
        Ok((release, started.elapsed()))
    }

    /// The CA that signed the agent API's certificate (the Secret's `ca.crt`).
    pub fn ca_file(&self) -> PathBuf {
        self.certificates.path().join("ca.crt")
    }

    /// The agent API as the process agents on this machine dial it.
    pub fn agent_api_url(&self) -> String {
        format!("https://{OPERATOR_CLUSTER_IP}:{AGENT_API_PORT}")
    }

    /// The operator's pods.
    pub async fn operator_pods(&self) -> anyhow::Result<Vec<Pod>> {
        Ok(
            Api::<Pod>::namespaced(self.client.clone(), RELEASE_NAMESPACE)
                .list(
                    &ListParams::default().labels(
                        "app.kubernetes.io/name=shoal,app.kubernetes.io/component=operator",
                    ),
                )
                .await?
                .items,
        )
    }

    /// Waits until an operator pod (other than `not_named`) is Ready; its name.
    pub async fn wait_operator_ready(&self, not_named: Option<&str>) -> anyhow::Result<String> {
        let deadline = Instant::now() + NODE_WAIT;
        loop {
            let pods = self.operator_pods().await?;
            if let Some(pod) = pods.iter().find(|pod| {
                pod_ready(pod)
                    && pod.metadata.deletion_timestamp.is_none()
                    && pod.metadata.name.as_deref() != not_named
            }) {
                return Ok(pod.metadata.name.clone().unwrap_or_default());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no operator pod became Ready within {NODE_WAIT:?}\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Sets the operator Deployment's replicas, as `kubectl scale` does, and waits
    /// until that many pods run (0: until none is left).
    pub async fn scale(&self, replicas: i32) -> anyhow::Result<()> {
        Api::<Deployment>::namespaced(self.client.clone(), RELEASE_NAMESPACE)
            .patch_scale(
                OPERATOR,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "replicas": replicas } })),
            )
            .await?;
        if replicas > 0 {
            self.wait_operator_ready(None).await?;
            return Ok(());
        }
        let deadline = Instant::now() + NODE_WAIT;
        while !self.operator_pods().await?.is_empty() {
            ensure!(
                Instant::now() < deadline,
                "operator pods still exist {NODE_WAIT:?} after scaling to 0"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// The operator pods' phases and the last lines of their logs, for errors.
    pub async fn describe(&self) -> String {
        let mut out = String::new();
        for pod in self.operator_pods().await.unwrap_or_default() {
            let name = pod.metadata.name.clone().unwrap_or_default();
            out.push_str(&format!(
                "operator pod {name}: {:?}\n",
                pod.status
                    .as_ref()
                    .map(|s| (&s.phase, &s.container_statuses))
            ));
            let logs = Api::<Pod>::namespaced(self.client.clone(), RELEASE_NAMESPACE)
                .logs(
                    &name,
                    &kube::api::LogParams {
                        tail_lines: Some(40),
                        ..Default::default()
                    },
                )
                .await
                .unwrap_or_else(|err| format!("(no logs: {err})"));
            out.push_str(&logs);
        }
        out
    }

    /// `helm uninstall`, then the namespace and the PersistentVolume go.
    pub async fn uninstall(self) -> anyhow::Result<()> {
        let status = tokio::process::Command::new("helm")
            .args([
                "uninstall",
                RELEASE,
                "--namespace",
                RELEASE_NAMESPACE,
                "--wait",
            ])
            .status()
            .await?;
        ensure!(status.success(), "helm uninstall failed");
        Api::<Namespace>::all(self.client.clone())
            .delete(RELEASE_NAMESPACE, &DeleteParams::default())
            .await?;
        let volumes = Api::<PersistentVolume>::all(self.client.clone());
        volumes
            .delete(&self.volume, &DeleteParams::default())
            .await?;
        let _ = std::fs::remove_dir_all(&self.volume_dir);
        Ok(())
    }
}
