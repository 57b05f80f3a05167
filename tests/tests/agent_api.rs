//! The agent API against the real control plane, over real HTTP, with tokens the
//! API server made for pods on kwok nodes: assignment long-polls with ETags,
//! artifact downloads with Range, reports that reach pool status and /metrics, the
//! 401/403 rules, and HTTPS with a configured certificate.

use anyhow::{Context as _, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::json;
use shoal_api::agent_protocol::{
    AgentReport, Assignment, ModelReport, ModelState, artifact_path, assignment_path, report_path,
};
use shoal_api::{EdgePool, Model, ModelRollout};
use shoal_tests::{
    KWOK_NODE_KEY, Operator, TestNamespace, client, create_kwok_node, delete_nodes, install_crds,
    pod_token, serving_certificate, sha256_hex, tiny_onnx_model, unbound_token, wait_for,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(90);
const POOL_LABEL: &str = "shoal.dev/test-pool";
const POOL: &str = "stores";
const AGENT_ACCOUNT: &str = "shoal-agent-stores";
const MODEL: &str = "ranker";
const ROLLOUT: &str = "ranker-rollout";
const CONFIG_MAP: &str = "ranker-onnx";
const AUDIENCE: &str = "shoal";

/// The tiny test model with a different doc_string (ModelProto field 6): the same
/// graph, other bytes, so a second version gets a digest of its own.
fn second_model_bytes() -> Vec<u8> {
    let mut bytes = tiny_onnx_model();
    bytes.extend_from_slice(&[0x32, 0x02, b'v', b'2']);
    bytes
}

/// One test's namespace, operator and fleet: two kwok nodes in pool `stores`, a
/// Ready Model `ranker` at version 1.0 and a step-less rollout of it to the pool.
struct Setup {
    client: Client,
    namespace: TestNamespace,
    operator: Operator,
    nodes: [String; 2],
    http: reqwest::Client,
}

impl Setup {
    async fn start(prefix: &str, operator_args: &[&str]) -> anyhow::Result<Setup> {
        let client = client().await?;
        install_crds(&client).await?;
        let namespace = TestNamespace::create(&client, prefix).await?;
        let ns = namespace.name().to_string();
        let operator = Operator::start_with_args(&ns, operator_args).await?;
        let nodes = [format!("{ns}-a"), format!("{ns}-b")];
        for node in &nodes {
            create_kwok_node(&client, node, &[(POOL_LABEL, ns.as_str())]).await?;
        }
        let setup = Setup {
            client,
            namespace,
            operator,
            nodes,
            // Longer than the longest long-poll the operator grants (60 s).
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()?,
        };
        setup.create_fleet().await?;
        Ok(setup)
    }

    fn ns(&self) -> &str {
        self.namespace.name()
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), self.ns())
    }

    async fn create_fleet(&self) -> anyhow::Result<()> {
        let config_map: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": CONFIG_MAP },
        }))?;
        let config_map = ConfigMap {
            binary_data: Some(BTreeMap::from([(
                "v1".to_string(),
                ByteString(tiny_onnx_model()),
            )])),
            ..config_map
        };
        self.api::<ConfigMap>()
            .create(&PostParams::default(), &config_map)
            .await?;
        let model: Model = serde_json::from_value(json!({
            "apiVersion": "shoal.dev/v1alpha1", "kind": "Model",
            "metadata": { "name": MODEL },
            "spec": { "version": "1.0", "source": { "configMap": { "name": CONFIG_MAP, "key": "v1" } } },
        }))?;
        self.api::<Model>()
            .create(&PostParams::default(), &model)
            .await?;
        let pool: EdgePool = serde_json::from_value(json!({
            "apiVersion": "shoal.dev/v1alpha1", "kind": "EdgePool",
            "metadata": { "name": POOL },
            "spec": {
                "nodeSelector": { "matchLabels": { POOL_LABEL: self.ns() } },
                "tolerations": [{ "key": KWOK_NODE_KEY, "operator": "Exists", "effect": "NoSchedule" }],
            },
        }))?;
        self.api::<EdgePool>()
            .create(&PostParams::default(), &pool)
            .await?;
        let rollout: ModelRollout = serde_json::from_value(json!({
            "apiVersion": "shoal.dev/v1alpha1", "kind": "ModelRollout",
            "metadata": { "name": ROLLOUT },
            "spec": { "model": MODEL, "version": "1.0", "pools": [POOL] },
        }))?;
        self.api::<ModelRollout>()
            .create(&PostParams::default(), &rollout)
            .await?;
        self.wait_model_version("1.0").await?;
        // Assignments follow the plan the rollout controller writes in status.
        wait_for(&self.api::<ModelRollout>(), ROLLOUT, WAIT, |rollout| {
            rollout
                .status
                .as_ref()
                .is_some_and(|s| s.canary_version.as_deref() == Some("1.0"))
        })
        .await
        .map(|_| ())
    }

    async fn wait_model_version(&self, version: &str) -> anyhow::Result<()> {
        wait_for(&self.api::<Model>(), MODEL, WAIT, |model| {
            model
                .status
                .as_ref()
                .is_some_and(|s| s.versions.iter().any(|v| v.version == version))
        })
        .await
        .with_context(|| format!("Model {MODEL} version {version} should become Ready"))?;
        Ok(())
    }

    /// The agent pod the pool's DaemonSet runs on `node` (kwok fakes it Running).
    async fn agent_pod(&self, node: &str) -> anyhow::Result<String> {
        let pods = self.api::<Pod>();
        let deadline = Instant::now() + WAIT;
        loop {
            let listed = pods
                .list(&ListParams::default().labels(&format!("shoal.dev/pool={POOL}")))
                .await?;
            let on_node = listed
                .items
                .into_iter()
                .find(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node));
            if let Some(name) = on_node.and_then(|pod| pod.metadata.name) {
                return Ok(name);
            }
            ensure!(
                Instant::now() < deadline,
                "the DaemonSet {AGENT_ACCOUNT} put no agent pod on node {node} within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The token the kubelet would project into the agent pod on `node`.
    async fn agent_token(&self, node: &str) -> anyhow::Result<String> {
        let pod = self.agent_pod(node).await?;
        pod_token(&self.client, self.ns(), AGENT_ACCOUNT, &pod, AUDIENCE).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.operator.agent_api_url())
    }

    async fn get(&self, path: &str, token: Option<&str>, headers: HeaderMap) -> reqwest::Response {
        let mut request = self.http.get(self.url(path)).headers(headers);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the agent API answers")
    }

    async fn post_report(
        &self,
        node: &str,
        token: Option<&str>,
        report: &AgentReport,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.url(&report_path(node)))
            .body(serde_json::to_vec(report).expect("a report serializes"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the agent API answers")
    }

    /// The test passed: remove the nodes, stop the operator, delete the namespace.
    async fn finish(self) -> anyhow::Result<()> {
        delete_nodes(&self.client, &self.nodes).await?;
        self.operator.stop().await?;
        self.namespace.delete().await
    }
}

fn if_none_match(etag: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        reqwest::header::IF_NONE_MATCH,
        HeaderValue::from_str(etag).expect("an ETag is a valid header value"),
    );
    headers
}

fn range(spec: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        reqwest::header::RANGE,
        HeaderValue::from_str(spec).expect("a valid Range"),
    );
    headers
}

/// reqwest is built without its `json` feature here.
async fn json_body<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> anyhow::Result<T> {
    let bytes = response.bytes().await?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("unexpected body: {}", String::from_utf8_lossy(&bytes)))
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}

fn report(node: &str, started: &str, version: &str, requests: u64, errors: u64) -> AgentReport {
    AgentReport {
        node: node.to_string(),
        agent_start_time: started.to_string(),
        agent_version: "test".into(),
        models: vec![ModelReport {
            name: MODEL.into(),
            version: version.into(),
            state: ModelState::Serving,
            requests,
            errors,
            ..Default::default()
        }],
    }
}

/// Polls the operator's /metrics until it has a line starting with `prefix` and
/// returns that line.
async fn wait_for_metric(operator: &Operator, prefix: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = operator.metrics().await?;
        if let Some(line) = text.lines().find(|line| line.starts_with(prefix)) {
            return Ok(line.to_string());
        }
        ensure!(
            Instant::now() < deadline,
            "/metrics has no line starting with {prefix} after 30s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn assignment_long_poll_and_artifact_downloads() -> anyhow::Result<()> {
    let setup = Setup::start("agent-api-poll", &[]).await?;
    let node = setup.nodes[0].clone();
    let token = setup.agent_token(&node).await?;
    let path = assignment_path(&node);
    let v1 = tiny_onnx_model();

    // Without If-None-Match the answer comes at once, with the Ready version's digest.
    let response = setup.get(&path, Some(&token), HeaderMap::new()).await;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    let etag = header(&response, "etag").to_string();
    ensure!(etag.starts_with('"'), "a strong, quoted ETag: {etag:?}");
    let assignment: Assignment = json_body(response).await?;
    ensure!(assignment.node == node, "{assignment:?}");
    ensure!(assignment.models.len() == 1, "{assignment:?}");
    let assigned = &assignment.models[0];
    let v1_hex = sha256_hex(&v1);
    ensure!(
        (assigned.name.as_str(), assigned.version.as_str()) == (MODEL, "1.0")
            && assigned.artifact_digest == format!("sha256:{v1_hex}")
            && assigned.artifact_bytes == v1.len() as u64
            && assigned.download_path == artifact_path(&v1_hex),
        "the node should serve {MODEL} 1.0 with the artifact's digest: {assigned:?}"
    );

    // The current ETag: the operator waits the full waitSeconds, then says 304.
    let asked = Instant::now();
    let waited_path = format!("{path}?waitSeconds=2");
    let response = setup
        .get(&waited_path, Some(&token), if_none_match(&etag))
        .await;
    let took = asked.elapsed();
    ensure!(
        response.status() == StatusCode::NOT_MODIFIED,
        "{}",
        response.status()
    );
    ensure!(header(&response, "etag") == etag);
    ensure!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "a long-poll with the current ETag should wait about 2 s, it took {took:?}"
    );
    // Another ETag: the answer comes at once.
    let asked = Instant::now();
    let response = setup
        .get(&waited_path, Some(&token), if_none_match("\"old\""))
        .await;
    ensure!(response.status() == StatusCode::OK && asked.elapsed() < Duration::from_secs(1));

    // A waiting long-poll wakes as soon as the assignment changes.
    let poll = {
        let request = setup
            .http
            .get(setup.url(&format!("{path}?waitSeconds=60")))
            .bearer_auth(&token)
            .headers(if_none_match(&etag));
        tokio::spawn(async move {
            let response = request.send().await;
            (Instant::now(), response)
        })
    };
    wait_for_metric(&setup.operator, "shoal_agent_api_long_polls_in_flight 1").await?;
    let v2 = second_model_bytes();
    let v2_hex = sha256_hex(&v2);
    let add_key = json!({ "binaryData": { "v2": ByteString(v2.clone()) } });
    setup
        .api::<ConfigMap>()
        .patch(CONFIG_MAP, &PatchParams::default(), &Patch::Merge(&add_key))
        .await?;
    let new_version = json!({ "spec": { "version": "2.0", "source": { "configMap": { "name": CONFIG_MAP, "key": "v2" } } } });
    setup
        .api::<Model>()
        .patch(MODEL, &PatchParams::default(), &Patch::Merge(&new_version))
        .await?;
    setup.wait_model_version("2.0").await?;
    ensure!(
        !poll.is_finished(),
        "a new Ready version alone changes no assignment: the rollout still says 1.0"
    );
    let bumped = Instant::now();
    setup
        .api::<ModelRollout>()
        .patch(
            ROLLOUT,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": { "version": "2.0" } })),
        )
        .await?;
    let (answered, response) = tokio::time::timeout(Duration::from_secs(30), poll)
        .await
        .context("the waiting long-poll should answer once the rollout changed")??;
    let response = response?;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    let woke_after = answered.saturating_duration_since(bumped);
    ensure!(
        answered >= bumped && woke_after < Duration::from_secs(5),
        "the long-poll should answer within seconds of the rollout change; it took {woke_after:?}"
    );
    let assignment: Assignment = json_body(response).await?;
    let assigned = &assignment.models[0];
    ensure!(
        assigned.version == "2.0" && assigned.artifact_digest == format!("sha256:{v2_hex}"),
        "after the bump the node serves 2.0: {assigned:?}"
    );

    // The artifact: whole, and in two ranges as a resumed download would fetch it.
    let download = assigned.download_path.clone();
    let full = setup.get(&download, Some(&token), HeaderMap::new()).await;
    ensure!(full.status() == StatusCode::OK, "{}", full.status());
    ensure!(header(&full, "accept-ranges") == "bytes");
    ensure!(
        header(&full, "cache-control").contains("immutable"),
        "{}",
        header(&full, "cache-control")
    );
    ensure!(header(&full, "content-length") == v2.len().to_string());
    ensure!(
        full.bytes().await?.as_ref() == v2.as_slice(),
        "the full download"
    );
    let len = v2.len();
    let first = setup
        .get(&download, Some(&token), range("bytes=0-99"))
        .await;
    ensure!(
        first.status() == StatusCode::PARTIAL_CONTENT,
        "{}",
        first.status()
    );
    ensure!(header(&first, "content-range") == format!("bytes 0-99/{len}"));
    let mut resumed = first.bytes().await?.to_vec();
    let rest = setup
        .get(&download, Some(&token), range("bytes=100-"))
        .await;
    ensure!(
        rest.status() == StatusCode::PARTIAL_CONTENT,
        "{}",
        rest.status()
    );
    ensure!(header(&rest, "content-range") == format!("bytes 100-{}/{len}", len - 1));
    resumed.extend_from_slice(&rest.bytes().await?);
    ensure!(
        resumed == v2,
        "a download resumed with Range gives the same bytes"
    );
    let past_end = setup
        .get(&download, Some(&token), range(&format!("bytes={len}-")))
        .await;
    ensure!(past_end.status() == StatusCode::RANGE_NOT_SATISFIABLE);
    ensure!(header(&past_end, "content-range") == format!("bytes */{len}"));
    // The old version's artifact is still there for agents that lag behind.
    let old = setup
        .get(&artifact_path(&v1_hex), Some(&token), HeaderMap::new())
        .await;
    ensure!(old.bytes().await?.as_ref() == v1.as_slice());
    let unknown = setup
        .get(
            &artifact_path(&"0".repeat(64)),
            Some(&token),
            HeaderMap::new(),
        )
        .await;
    ensure!(
        unknown.status() == StatusCode::NOT_FOUND,
        "{}",
        unknown.status()
    );
    let malformed = setup
        .get(
            &artifact_path("not-a-digest"),
            Some(&token),
            HeaderMap::new(),
        )
        .await;
    ensure!(
        malformed.status() == StatusCode::BAD_REQUEST,
        "{}",
        malformed.status()
    );

    setup.finish().await
}

#[tokio::test]
async fn reports_reach_pool_status_and_metrics() -> anyhow::Result<()> {
    let setup = Setup::start("agent-api-report", &["--agent-stale-after", "10s"]).await?;
    let node = setup.nodes[0].clone();
    let token = setup.agent_token(&node).await?;
    let ns = setup.ns().to_string();
    let started = k8s_openapi::jiff::Timestamp::now().to_string();

    for (requests, errors) in [(10, 1), (25, 2)] {
        let response = setup
            .post_report(
                &node,
                Some(&token),
                &report(&node, &started, "1.0", requests, errors),
            )
            .await;
        ensure!(
            response.status() == StatusCode::NO_CONTENT,
            "{}",
            response.status()
        );
    }
    let series =
        format!("{{namespace=\"{ns}\",model=\"{MODEL}\",version=\"1.0\",pool=\"{POOL}\"}}");
    wait_for_metric(
        &setup.operator,
        &format!("shoal_fleet_requests_total{series} 25"),
    )
    .await?;
    wait_for_metric(
        &setup.operator,
        &format!("shoal_fleet_errors_total{series} 2"),
    )
    .await?;

    // A restarted agent (new start time) counts from zero: 25 + 5.
    let restarted = k8s_openapi::jiff::Timestamp::now().to_string();
    ensure!(restarted != started);
    let response = setup
        .post_report(&node, Some(&token), &report(&node, &restarted, "1.0", 5, 0))
        .await;
    ensure!(
        response.status() == StatusCode::NO_CONTENT,
        "{}",
        response.status()
    );
    wait_for_metric(
        &setup.operator,
        &format!("shoal_fleet_requests_total{series} 30"),
    )
    .await?;

    // Bad reports are refused with what to fix.
    let other_node = report(&setup.nodes[1], &restarted, "1.0", 5, 0);
    let response = setup.post_report(&node, Some(&token), &other_node).await;
    ensure!(
        response.status() == StatusCode::BAD_REQUEST,
        "{}",
        response.status()
    );
    let garbage = setup
        .http
        .post(setup.url(&report_path(&node)))
        .bearer_auth(&token)
        .body("{not json")
        .send()
        .await?;
    ensure!(
        garbage.status() == StatusCode::BAD_REQUEST,
        "{}",
        garbage.status()
    );

    // Node a keeps reporting; node b's agent never does, so after 10 s it is stale.
    let reporter = {
        let request = setup
            .http
            .post(setup.url(&report_path(&node)))
            .bearer_auth(&token)
            .body(serde_json::to_vec(&report(&node, &restarted, "1.0", 5, 0))?);
        tokio::spawn(async move {
            loop {
                if let Some(request) = request.try_clone() {
                    let _ = request.send().await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let pool = wait_for(
        &setup.api::<EdgePool>(),
        POOL,
        Duration::from_secs(60),
        |pool| {
            pool.status.as_ref().is_some_and(|status| {
                status.agents_stale == 1
                    && status.versions.len() == 1
                    && status.versions[0].model == MODEL
                    && status.versions[0].version == "1.0"
                    && status.versions[0].agents == 1
            })
        },
    )
    .await
    .context("the pool's status should count one agent serving 1.0 and one stale agent")?;
    ensure!(pool.status.as_ref().is_some_and(|s| s.nodes == 2));
    let agents = format!("shoal_fleet_agents{{namespace=\"{ns}\",pool=\"{POOL}\",state=");
    wait_for_metric(&setup.operator, &format!("{agents}\"connected\"}} 1")).await?;
    wait_for_metric(&setup.operator, &format!("{agents}\"stale\"}} 1")).await?;
    reporter.abort();
    wait_for_metric(
        &setup.operator,
        "shoal_agent_api_requests_total{route=\"report\",code=\"204\"}",
    )
    .await?;

    setup.finish().await
}

#[tokio::test]
async fn only_a_nodes_own_agent_may_call() -> anyhow::Result<()> {
    let setup = Setup::start("agent-api-auth", &[]).await?;
    let ns = setup.ns().to_string();
    let [node_a, node_b] = setup.nodes.clone();
    let token_a = setup.agent_token(&node_a).await?;
    let token_b = setup.agent_token(&node_b).await?;
    let pod_a = setup.agent_pod(&node_a).await?;
    let wrong_audience = pod_token(&setup.client, &ns, AGENT_ACCOUNT, &pod_a, "other").await?;
    let unbound = unbound_token(&setup.client, &ns, AGENT_ACCOUNT, AUDIENCE).await?;
    // Another workload on node a, with a ServiceAccount of its own.
    let intruder_account: ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": "not-an-agent" } }))?;
    setup
        .api::<ServiceAccount>()
        .create(&PostParams::default(), &intruder_account)
        .await?;
    let intruder: Pod = serde_json::from_value(json!({
        "metadata": { "name": "intruder" },
        "spec": {
            "nodeName": node_a,
            "serviceAccountName": "not-an-agent",
            "automountServiceAccountToken": false,
            "tolerations": [{ "key": KWOK_NODE_KEY, "operator": "Exists" }],
            "containers": [{ "name": "c", "image": "registry.invalid/intruder" }],
        },
    }))?;
    setup
        .api::<Pod>()
        .create(&PostParams::default(), &intruder)
        .await?;
    let not_an_agent = pod_token(&setup.client, &ns, "not-an-agent", "intruder", AUDIENCE).await?;

    let artifact = artifact_path(&sha256_hex(&tiny_onnx_model()));
    let report_a = report(&node_a, "2025-01-01T00:00:00Z", "1.0", 1, 0);
    // (who, token, status on a's assignment, a's report, an artifact)
    let cases: [(&str, Option<&str>, StatusCode, StatusCode, StatusCode); 7] = [
        (
            "the agent of node a",
            Some(&token_a),
            StatusCode::OK,
            StatusCode::NO_CONTENT,
            StatusCode::OK,
        ),
        (
            "no token",
            None,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "not a token",
            Some("garbage"),
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "audience other than shoal",
            Some(&wrong_audience),
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "the agent of node b",
            Some(&token_b),
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
            StatusCode::OK,
        ),
        (
            "another ServiceAccount on node a",
            Some(&not_an_agent),
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            "the agent account, bound to no pod",
            Some(&unbound),
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
    ];
    for (who, token, on_assignment, on_report, on_artifact) in cases {
        let response = setup
            .get(&assignment_path(&node_a), token, HeaderMap::new())
            .await;
        ensure!(
            response.status() == on_assignment,
            "{who} on node a's assignment: expected {on_assignment}, got {}",
            response.status()
        );
        if on_assignment == StatusCode::UNAUTHORIZED {
            ensure!(
                header(&response, "www-authenticate").starts_with("Bearer"),
                "{who}"
            );
        }
        if !on_assignment.is_success() {
            let body: serde_json::Value = json_body(response).await?;
            ensure!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{who}: an error says why: {body}"
            );
        }
        let response = setup.post_report(&node_a, token, &report_a).await;
        ensure!(
            response.status() == on_report,
            "{who} reporting for node a: expected {on_report}, got {}",
            response.status()
        );
        let response = setup.get(&artifact, token, HeaderMap::new()).await;
        ensure!(
            response.status() == on_artifact,
            "{who} downloading an artifact: expected {on_artifact}, got {}",
            response.status()
        );
    }
    // Node b's agent may of course read its own assignment.
    let response = setup
        .get(&assignment_path(&node_b), Some(&token_b), HeaderMap::new())
        .await;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());

    for code in ["200", "401", "403"] {
        wait_for_metric(
            &setup.operator,
            &format!("shoal_agent_api_requests_total{{route=\"assignment\",code=\"{code}\"}}"),
        )
        .await?;
    }
    setup.finish().await
}

#[tokio::test]
async fn agent_api_serves_https_with_the_configured_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certificate = serving_certificate(dir.path())?;
    let cert = certificate.cert.to_string_lossy().to_string();
    let key = certificate.key.to_string_lossy().to_string();
    let setup = Setup::start("agent-api-tls", &["--tls-cert", &cert, "--tls-key", &key]).await?;
    let node = setup.nodes[0].clone();
    let token = setup.agent_token(&node).await?;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&certificate.ca)?)?;
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!(
        "https://{}{}",
        setup.operator.agent_api_addr(),
        assignment_path(&node)
    );
    let response = https.get(&url).bearer_auth(&token).send().await?;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    let assignment: Assignment = json_body(response).await?;
    ensure!(assignment.models.len() == 1, "{assignment:?}");
    // Plain HTTP on the TLS port gets no answer.
    let plain = setup
        .http
        .get(setup.url(&assignment_path(&node)))
        .bearer_auth(&token)
        .send()
        .await;
    ensure!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP must not work on the HTTPS listener: {plain:?}"
    );
    setup.finish().await
}
