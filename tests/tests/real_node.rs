//! Shoal on a real node (`make node-test`; needs `make node-up`: a kubelet with
//! containerd and runc, the images of `make images` imported the way an air-gapped
//! k3s imports them). The chart is installed with helm as the README tells users; the
//! operator runs as a pod from its image; an EdgePool selecting the real node makes
//! the kubelet run the agent pod from its image; two kwok nodes in a second pool are
//! served by `shoal-agent` processes on this machine. Then, in order:
//!
//! 1. EdgePool applied → the agent pod is Ready and a client on the node is served
//!    through the pool's Service (`internalTrafficPolicy: Local`);
//! 2. a rollout 1.0 → 2.0 across the real node and the process agents, with no
//!    failed request through the Service;
//! 3. the operator scaled to 0 and the agent container killed: the kubelet restarts
//!    it and it serves 2.0 from its cache while no operator answers;
//! 4. containerd restarted: the running agent keeps serving, no request fails;
//! 5. the operator pod deleted during a rollout 2.0 → 1.0: a new pod takes over, the
//!    rollout finishes, no request fails;
//! 6. the agent pod's projected token is accepted for its own node and refused for
//!    another node's.
//!
//! It prints its figures and writes them to target/node/figures.md. One test, steps
//! in order: each builds on the state the one before left.

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use serde_json::json;
use shoal_api::agent_protocol::assignment_path;
use shoal_api::{EdgePool, ModelRollout, RolloutPhase};
use shoal_tests::agent_process::Agent;
use shoal_tests::cluster::{TestNamespace, client, workspace_dir};
use shoal_tests::credentials::pod_token;
use shoal_tests::fleet::{
    AUDIENCE, CONFIG_MAP, Load, MODEL, Outcome, ROLLOUT, TEST_LABEL, create_model_and_pools,
    ensure_no_failures, infer, served_versions,
};
use shoal_tests::kwok_nodes::{create_kwok_node, delete_nodes};
use shoal_tests::model_objects;
use shoal_tests::onnx_models::tiny_onnx_model_scaled;
use shoal_tests::real_node::{NODE_WAIT, RealNode, Release, container_state, pod_ready};
use shoal_tests::wait::wait_for;
use std::time::{Duration, Instant};

/// The pool of the real node, and the pool of the kwok nodes.
const REAL_POOL: &str = "store";
const KWOK_POOL: &str = "lanes";
const KWOK_NODES: usize = 2;

#[tokio::test]
async fn shoal_on_a_real_node() -> anyhow::Result<()> {
    let client = client().await?;
    let node = RealNode::up(&client).await?;
    let mut figures = Figures::default();

    let (release, install_time) = Release::install(&client).await?;
    figures.add(
        "`helm install` → operator pod Ready",
        format!("{:.1} s", install_time.as_secs_f64()),
    );

    let namespace = TestNamespace::create(&client, "real-node").await?;
    let ns = namespace.name().to_string();
    let kwok_nodes: Vec<String> = (0..KWOK_NODES).map(|i| format!("{ns}-lane-{i}")).collect();
    for name in &kwok_nodes {
        create_kwok_node(&client, name, &[(TEST_LABEL, ns.as_str())]).await?;
    }
    let test = Test {
        client: client.clone(),
        ns: ns.clone(),
        node: node.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
    };
    test.create_model_and_pools().await?;

    // 1. The agent pod on the real node, Ready and serving through the Service.
    let pool_applied = Instant::now();
    let service_url = test.pool_service_url().await?;
    let pod = test.wait_agent_pod_ready(None).await?;
    test.wait_serves(&service_url, "1.0").await?;
    figures.add(
        "EdgePool applied → agent pod Ready and serving 1.0 through its Service",
        format!("{:.1} s", pool_applied.elapsed().as_secs_f64()),
    );
    test.wait_pool_counts_agent().await?;

    // The process agents of the kwok nodes dial the operator's Service.
    let ca = release.ca_file();
    let ca = ca.to_string_lossy();
    let mut agents = Vec::new();
    for name in &kwok_nodes {
        let pod = test.kwok_agent_pod(name).await?;
        let token = pod_token(
            &client,
            &ns,
            &format!("shoal-agent-{KWOK_POOL}"),
            &pod,
            AUDIENCE,
        )
        .await?;
        agents.push(
            Agent::start(
                &release.agent_api_url(),
                name,
                &token,
                &["--control-plane-ca", &ca, "--report-seconds", "1"],
            )
            .await?,
        );
    }
    for agent in &agents {
        test.wait_serves(agent.url(), "1.0").await?;
    }

    // 2. A rollout 1.0 → 2.0 across the real node and the process agents.
    test.make_version_ready("2.0", "v2").await?;
    let load = Load::start(
        &service_url,
        2,
        Duration::from_millis(20),
        NODE_WAIT,
        20_000,
    );
    let rollout_started = Instant::now();
    test.patch_rollout(json!({
        "version": "2.0",
        "steps": [{ "setWeight": 50 }, { "pause": { "duration": "5s" } }, { "setWeight": 100 }],
    }))
    .await?;
    test.wait_rollout_succeeded("2.0", &release).await?;
    test.wait_serves(&service_url, "2.0").await?;
    for agent in &agents {
        test.wait_serves(agent.url(), "2.0").await?;
    }
    let outcomes = load.finish().await?;
    let requests = ensure_no_failures(
        "through the Service during the 1.0 → 2.0 rollout",
        &outcomes,
    )?;
    figures.add(
        "rollout 1.0 → 2.0 (setWeight 50, pause 5 s, 100) on 1 real + 2 process agents",
        format!(
            "{:.1} s, {requests} requests through the Service, 0 failed",
            rollout_started.elapsed().as_secs_f64()
        ),
    );

    // 3. The operator away and the agent container killed: the kubelet restarts it
    // and it serves 2.0 from its cache before any operator answers.
    release.scale(0).await?;
    let pod_before = test.agent_pod(&pod).await?;
    let (container, restarts) =
        container_state(&pod_before, "agent").context("the agent container has no id yet")?;
    let killed = Instant::now();
    node.kill_container(&container).await?;
    let pod_after = test
        .wait_agent_pod_ready(Some(restarts))
        .await
        .context("the kubelet should restart the killed agent container")?;
    ensure!(
        pod_after == pod,
        "the agent pod should be the same pod, restarted"
    );
    test.wait_serves(&service_url, "2.0").await?;
    ensure!(
        release.operator_pods().await?.is_empty(),
        "the agent must serve before any operator runs"
    );
    figures.add(
        "agent container killed (operator at 0 replicas) → restarted by the kubelet, serving 2.0 from its cache",
        format!("{:.1} s", killed.elapsed().as_secs_f64()),
    );
    release.scale(1).await?;

    // 4. containerd restarted under load: the running agent keeps serving.
    let load = Load::start(
        &service_url,
        2,
        Duration::from_millis(20),
        NODE_WAIT,
        20_000,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let away = node.restart_containerd().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outcomes = load.finish().await?;
    let requests = ensure_no_failures("through the Service while containerd restarted", &outcomes)?;
    let (_, restarts_after) =
        container_state(&test.agent_pod(&pod).await?, "agent").context("agent container")?;
    ensure!(
        restarts_after == restarts + 1,
        "a containerd restart must not restart the agent (restarts {restarts} + 1 before, {restarts_after} after)"
    );
    figures.add(
        "containerd restarted",
        format!(
            "away {:.1} s, {requests} requests through the Service, 0 failed",
            away.as_secs_f64()
        ),
    );

    // 5. The operator pod deleted during a rollout 2.0 → 1.0.
    let load = Load::start(
        &service_url,
        2,
        Duration::from_millis(20),
        NODE_WAIT,
        40_000,
    );
    test.patch_rollout(json!({
        "version": "1.0",
        "steps": [{ "setWeight": 50 }, { "pause": { "duration": "20s" } }, { "setWeight": 100 }],
    }))
    .await?;
    wait_for(&test.api::<ModelRollout>(), ROLLOUT, NODE_WAIT, |r| {
        r.status.as_ref().is_some_and(|s| {
            s.canary_version.as_deref() == Some("1.0") && s.current_step.unwrap_or(0) >= 1
        })
    })
    .await
    .context("the rollout to 1.0 should pass its first step")?;
    let old_operator = release.wait_operator_ready(None).await?;
    let deleted = Instant::now();
    Api::<Pod>::namespaced(client.clone(), shoal_tests::real_node::RELEASE_NAMESPACE)
        .delete(&old_operator, &DeleteParams::default())
        .await?;
    let new_operator = release.wait_operator_ready(Some(&old_operator)).await?;
    let takeover = deleted.elapsed();
    test.wait_rollout_succeeded("1.0", &release).await?;
    test.wait_serves(&service_url, "1.0").await?;
    for agent in &agents {
        test.wait_serves(agent.url(), "1.0").await?;
    }
    let outcomes = load.finish().await?;
    let requests = ensure_no_failures(
        "through the Service while the operator pod was replaced",
        &outcomes,
    )?;
    figures.add(
        "operator pod deleted mid-rollout → new pod Ready; rollout 2.0 → 1.0 finished",
        format!(
            "new pod {new_operator} Ready after {:.1} s; rollout done {:.1} s after the delete; {requests} requests, 0 failed",
            takeover.as_secs_f64(),
            deleted.elapsed().as_secs_f64()
        ),
    );

    // 6. The agent pod's projected token: its own node yes, another node's no.
    let uid = test
        .agent_pod(&pod)
        .await?
        .metadata
        .uid
        .context("the agent pod has a uid")?;
    let token_file = node.projected_file(&uid, "shoal-token", "token");
    let token = std::fs::read_to_string(&token_file).with_context(|| {
        format!(
            "the kubelet should project the token at {}",
            token_file.display()
        )
    })?;
    let ca_pem = std::fs::read(release.ca_file())?;
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem)?)
        .timeout(Duration::from_secs(10))
        .build()?;
    let ask = |node_name: String| {
        let https = https.clone();
        let url = format!("{}{}", release.agent_api_url(), assignment_path(&node_name));
        let token = token.trim().to_string();
        async move {
            https
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    let own = ask(node.name.clone()).await?;
    ensure!(
        own == 200,
        "the agent pod's own token for its own node should be accepted, got {own}"
    );
    let other = ask(kwok_nodes[0].clone()).await?;
    ensure!(
        other == 403,
        "the real node's token replayed for node {} should be refused with 403, got {other}",
        kwok_nodes[0]
    );
    figures.add(
        "projected token: own node / another node",
        format!("{own} / {other}"),
    );

    for agent in agents {
        agent.stop().await?;
    }
    figures.write()?;
    delete_nodes(&client, &kwok_nodes).await?;
    namespace.delete().await?;
    release.uninstall().await?;
    Ok(())
}

/// What the steps share: the test namespace and the real node.
struct Test {
    client: Client,
    ns: String,
    node: RealNode,
    http: reqwest::Client,
}

impl Test {
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// ConfigMap with the model's versions, Model `ranker` at 1.0, EdgePool `store`
    /// selecting the real node, EdgePool `lanes` selecting the kwok nodes, and the
    /// first rollout of 1.0 to both.
    async fn create_model_and_pools(&self) -> anyhow::Result<()> {
        let model_files = [
            ("v1", tiny_onnx_model_scaled(1.0)),
            ("v2", tiny_onnx_model_scaled(2.0)),
        ];
        let (key, value) = &self.node.label;
        let pools = [
            (REAL_POOL, json!({ "matchLabels": { key: value } })),
            (KWOK_POOL, json!({ "matchLabels": { TEST_LABEL: self.ns } })),
        ];
        // autoRollback true is the CRD's default.
        create_model_and_pools(
            &self.client,
            &self.ns,
            &model_files,
            &pools,
            true,
            NODE_WAIT,
        )
        .await
    }

    async fn make_version_ready(&self, version: &str, key: &str) -> anyhow::Result<()> {
        model_objects::make_version_ready(&self.api(), MODEL, CONFIG_MAP, version, key, NODE_WAIT)
            .await
    }

    async fn patch_rollout(&self, spec: serde_json::Value) -> anyhow::Result<()> {
        model_objects::patch_rollout(&self.api(), ROLLOUT, spec).await
    }

    async fn wait_rollout_succeeded(&self, version: &str, release: &Release) -> anyhow::Result<()> {
        let result = wait_for(&self.api::<ModelRollout>(), ROLLOUT, NODE_WAIT, |r| {
            r.status.as_ref().is_some_and(|s| {
                s.phase == Some(RolloutPhase::Succeeded)
                    && s.canary_version.as_deref() == Some(version)
            })
        })
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => {
                let rollout = self.api::<ModelRollout>().get(ROLLOUT).await?;
                Err(err.context(format!(
                    "rollout to {version} should succeed; its status: {:?}\n{}",
                    rollout.status,
                    release.describe().await
                )))
            }
        }
    }

    /// `http://<ClusterIP>:<port>` of the real pool's Service, once it exists.
    async fn pool_service_url(&self) -> anyhow::Result<String> {
        let name = format!("shoal-agent-{REAL_POOL}");
        let service = wait_for(&self.api::<Service>(), &name, NODE_WAIT, |s| {
            s.spec
                .as_ref()
                .and_then(|s| s.cluster_ip.as_ref())
                .is_some()
        })
        .await
        .with_context(|| format!("the EdgePool should own a Service {name}"))?;
        let spec = service.spec.context("the Service has a spec")?;
        ensure!(
            spec.internal_traffic_policy.as_deref() == Some("Local"),
            "the pool's Service should keep a node's clients on its own agent (internalTrafficPolicy Local), not {:?}",
            spec.internal_traffic_policy
        );
        let port = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name.as_deref() == Some("inference"))
            .context("the pool's Service has a port named inference")?
            .port;
        Ok(format!(
            "http://{}:{port}",
            spec.cluster_ip.unwrap_or_default()
        ))
    }

    /// The name of the agent pod on the real node, once it is Ready (and, given a
    /// restart count, once its agent container restarted more often than that).
    async fn wait_agent_pod_ready(&self, restarted_after: Option<i32>) -> anyhow::Result<String> {
        let deadline = Instant::now() + NODE_WAIT;
        loop {
            let pods = self
                .api::<Pod>()
                .list(&ListParams::default().labels(&format!("shoal.dev/pool={REAL_POOL}")))
                .await?;
            let on_node = pods.items.iter().find(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.node.name)
            });
            if let Some(pod) = on_node {
                let restarted = match restarted_after {
                    None => true,
                    Some(before) => {
                        container_state(pod, "agent").is_some_and(|(_, now)| now > before)
                    }
                };
                if pod_ready(pod) && restarted {
                    return Ok(pod.metadata.name.clone().unwrap_or_default());
                }
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "the agent pod on {} is not Ready within {NODE_WAIT:?}: {:?}\nits log:\n{}",
                        self.node.name,
                        pod.status,
                        self.agent_log(pod).await
                    );
                }
            } else if Instant::now() >= deadline {
                anyhow::bail!("no agent pod on {} within {NODE_WAIT:?}", self.node.name);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn agent_log(&self, pod: &Pod) -> String {
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.api::<Pod>()
            .logs(
                &name,
                &kube::api::LogParams {
                    container: Some("agent".into()),
                    tail_lines: Some(40),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|err| format!("(no log: {err})"))
    }

    async fn agent_pod(&self, name: &str) -> anyhow::Result<Pod> {
        Ok(self.api::<Pod>().get(name).await?)
    }

    /// The DaemonSet's pod on a kwok node (kwok fakes it Running).
    async fn kwok_agent_pod(&self, node: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + NODE_WAIT;
        loop {
            let pods = self
                .api::<Pod>()
                .list(&ListParams::default().labels(&format!("shoal.dev/pool={KWOK_POOL}")))
                .await?;
            if let Some(pod) = pods
                .items
                .into_iter()
                .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            {
                return Ok(pod.metadata.name.unwrap_or_default());
            }
            ensure!(
                Instant::now() < deadline,
                "no agent pod on kwok node {node} within {NODE_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until inference at `url` answers from `version` (its scores too).
    async fn wait_serves(&self, url: &str, version: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + NODE_WAIT;
        loop {
            let last: Outcome = infer(&self.http, url).await;
            if last.ok() && last.version() == Some(version) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let versions = served_versions(&self.http, url).await.ok().flatten();
                anyhow::bail!(
                    "{url} should answer from {MODEL} {version} within {NODE_WAIT:?}; last answer {last:?}, metadata {versions:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the real pool's status counts its agent as ready.
    async fn wait_pool_counts_agent(&self) -> anyhow::Result<()> {
        wait_for(&self.api::<EdgePool>(), REAL_POOL, NODE_WAIT, |pool| {
            pool.status.as_ref().is_some_and(|s| s.agents_ready >= 1)
        })
        .await
        .context("EdgePool store should count the real node's agent as ready (its reports reach the operator)")?;
        Ok(())
    }
}

/// The figures the test measured, printed and written to target/node/figures.md.
#[derive(Default)]
struct Figures(Vec<(String, String)>);

impl Figures {
    fn add(&mut self, what: &str, figure: String) {
        println!("real node: {what}: {figure}");
        self.0.push((what.to_string(), figure));
    }

    fn write(&self) -> anyhow::Result<()> {
        let mut table = String::from("| what | measured |\n| --- | --- |\n");
        for (what, figure) in &self.0 {
            table.push_str(&format!("| {what} | {figure} |\n"));
        }
        let path = workspace_dir().join("target/node/figures.md");
        std::fs::write(&path, &table)?;
        println!("{table}(also in {})", path.display());
        Ok(())
    }
}
