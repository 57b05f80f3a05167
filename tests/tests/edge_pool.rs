//! The EdgePool controller against the real control plane and kwok nodes: the pool's
//! agent DaemonSet puts one (kwok-faked) agent pod on each selected, tainted node, the
//! node count follows label changes, and the garbage collector removes the DaemonSet
//! with the pool.

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use shoal_api::EdgePool;
use shoal_tests::{
    KWOK_NODE_KEY, Operator, TestNamespace, client, create_kwok_node, delete_nodes, install_crds,
    wait_for, wait_until_gone,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);
/// The operator also re-reconciles every pool each 60 s; waiting less than that
/// proves the node watch, not the periodic pass, picked up a label change.
const NODE_CHANGE_WAIT: Duration = Duration::from_secs(30);
const POOL_LABEL: &str = "shoal.dev/test-pool";
const RUN_LABEL: &str = "shoal.dev/test-run";

/// (agents the DaemonSet controller wants scheduled, agents Ready), as it counts them.
fn agent_counts(daemon_set: &DaemonSet) -> (i32, i32) {
    daemon_set.status.as_ref().map_or((0, 0), |status| {
        (status.desired_number_scheduled, status.number_ready)
    })
}

fn ensure_owned_by_pool(object: &impl ResourceExt, pool: &EdgePool) -> anyhow::Result<()> {
    let owner = object
        .owner_references()
        .first()
        .with_context(|| format!("{} has no owner reference", object.name_any()))?;
    ensure!(
        owner.kind == "EdgePool"
            && owner.name == pool.name_any()
            && Some(&owner.uid) == pool.uid().as_ref()
            && owner.controller == Some(true),
        "{} should be controlled by EdgePool {}: {owner:?}",
        object.name_any(),
        pool.name_any()
    );
    Ok(())
}

/// The nodes the pool's agent pods were scheduled on.
async fn agent_nodes(pods: &Api<Pod>) -> anyhow::Result<BTreeSet<String>> {
    let listed = pods
        .list(&ListParams::default().labels("shoal.dev/pool=stores"))
        .await?;
    Ok(listed
        .items
        .iter()
        .filter_map(|pod| pod.spec.as_ref()?.node_name.clone())
        .collect())
}

#[tokio::test]
async fn edge_pool_runs_its_agents_on_the_selected_nodes() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "edge-pool").await?;
    let operator = Operator::start(namespace.name()).await?;
    let run = namespace.name().to_string();

    // Two nodes in the pool, one outside it until its label changes.
    let nodes: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("{run}-{n}"))
        .collect();
    let other = format!("{run}-other");
    for (name, pool_value) in [
        (&nodes[0], run.as_str()),
        (&nodes[1], run.as_str()),
        (&nodes[2], other.as_str()),
    ] {
        create_kwok_node(
            &client,
            name,
            &[(POOL_LABEL, pool_value), (RUN_LABEL, run.as_str())],
        )
        .await?;
    }
    let node_api: Api<Node> = Api::all(client.clone());
    for name in &nodes {
        wait_for(&node_api, name, WAIT, |node| {
            let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
            conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await
        .context("kwok should make its nodes Ready")?;
    }

    // matchLabels become the pods' nodeSelector, matchExpressions their node affinity.
    let pools: Api<EdgePool> = Api::namespaced(client.clone(), namespace.name());
    let pool: EdgePool = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "EdgePool",
        "metadata": { "name": "stores" },
        "spec": {
            "nodeSelector": {
                "matchLabels": { POOL_LABEL: run },
                "matchExpressions": [{ "key": RUN_LABEL, "operator": "Exists" }],
            },
            "tolerations": [{ "key": KWOK_NODE_KEY, "operator": "Exists", "effect": "NoSchedule" }],
        },
    }))?;
    let pool = pools.create(&PostParams::default(), &pool).await?;

    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace.name());
    let daemon_set = wait_for(&daemon_sets, "shoal-agent-stores", WAIT, |_| true).await?;
    ensure_owned_by_pool(&daemon_set, &pool)?;
    // The agents run as a ServiceAccount of their own (its token is what they
    // present to the operator), also owned by the pool.
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace.name());
    let service_account = wait_for(&service_accounts, "shoal-agent-stores", WAIT, |_| true).await?;
    ensure_owned_by_pool(&service_account, &pool)?;
    let pod = daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .context("the DaemonSet has a pod template")?;
    let expected_selector = BTreeMap::from([(POOL_LABEL.to_string(), run.clone())]);
    ensure!(
        pod.node_selector.as_ref() == Some(&expected_selector),
        "the pods' nodeSelector should be the pool's matchLabels: {:?}",
        pod.node_selector
    );
    let terms = pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|required| &required.node_selector_terms)
        .context("the pods need a required node affinity from matchExpressions")?;
    ensure!(
        terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .any(|e| e.key == RUN_LABEL && e.operator == "Exists")
        }),
        "the node affinity should carry the matchExpression: {terms:?}"
    );
    ensure!(
        pod.service_account_name.as_deref() == Some("shoal-agent-stores"),
        "the agents should run as the pool's ServiceAccount: {:?}",
        pod.service_account_name
    );
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    ensure!(
        tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some(KWOK_NODE_KEY)
                && t.effect.as_deref() == Some("NoSchedule")),
        "the pods should tolerate the kwok taint: {tolerations:?}"
    );

    wait_for(&pools, "stores", WAIT, |pool| {
        pool.status
            .as_ref()
            .is_some_and(|s| s.nodes == 2 && s.daemon_set.as_deref() == Some("shoal-agent-stores"))
    })
    .await?;
    // The DaemonSet controller, the scheduler and kwok agree: the selector and the
    // toleration put one Ready agent on each of the two nodes, and nowhere else.
    wait_for(&daemon_sets, "shoal-agent-stores", WAIT, |ds| {
        agent_counts(ds) == (2, 2)
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace.name());
    let placed = agent_nodes(&pods).await?;
    ensure!(
        placed == BTreeSet::from([nodes[0].clone(), nodes[1].clone()]),
        "agents should run on {:?} only; they run on {placed:?}",
        &nodes[..2]
    );

    let relabel = json!({ "metadata": { "labels": { POOL_LABEL: run } } });
    node_api
        .patch(&nodes[2], &PatchParams::default(), &Patch::Merge(&relabel))
        .await?;
    wait_for(&pools, "stores", NODE_CHANGE_WAIT, |pool| {
        pool.status.as_ref().is_some_and(|s| s.nodes == 3)
    })
    .await
    .context("the operator should recount a pool's nodes when a node's labels change")?;
    wait_for(&daemon_sets, "shoal-agent-stores", WAIT, |ds| {
        agent_counts(ds) == (3, 3)
    })
    .await?;
    let placed = agent_nodes(&pods).await?;
    ensure!(
        placed == nodes.iter().cloned().collect(),
        "agents should run on all of {nodes:?}; they run on {placed:?}"
    );

    // Background deletion: the pool goes at once, the garbage collector follows the
    // owner references to the DaemonSet and the ServiceAccount.
    pools.delete("stores", &DeleteParams::default()).await?;
    wait_until_gone(&daemon_sets, "shoal-agent-stores", Duration::from_secs(120))
        .await
        .context(
            "kube-controller-manager's garbage collector should delete the pool's DaemonSet",
        )?;
    wait_until_gone(
        &service_accounts,
        "shoal-agent-stores",
        Duration::from_secs(120),
    )
    .await
    .context("the garbage collector should delete the pool's ServiceAccount")?;

    delete_nodes(&client, &nodes).await?;
    operator.stop().await?;
    namespace.delete().await
}

/// Issue: a namespace user could set the agent image, tolerate every taint and
/// select control-plane nodes, and the operator would run that DaemonSet with its
/// own rights. Now the pool is refused with every reason, and nothing is applied.
#[tokio::test]
async fn a_pool_that_would_run_a_foreign_image_on_control_plane_nodes_is_refused()
-> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let namespace = TestNamespace::create(&client, "pool-policy").await?;
    let operator = Operator::start(namespace.name()).await?;
    let pools: Api<EdgePool> = Api::namespaced(client.clone(), namespace.name());
    let pool: EdgePool = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "EdgePool",
        "metadata": { "name": "intruder" },
        "spec": {
            "nodeSelector": { "matchLabels": { "node-role.kubernetes.io/control-plane": "" } },
            "tolerations": [{ "operator": "Exists" }],
            "agent": { "image": "docker.io/attacker/miner:latest" },
        },
    }))?;
    pools.create(&PostParams::default(), &pool).await?;

    let refused = wait_for(&pools, "intruder", WAIT, |pool| {
        pool.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "NotAllowed")
        })
    })
    .await?;
    let message = refused
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    for part in [
        "spec.agent.image \"docker.io/attacker/miner:latest\" is not from an allowed repository",
        "spec.tolerations[0] has no key",
        "spec.nodeSelector selects control-plane nodes",
    ] {
        ensure!(
            message.contains(part),
            "the refusal says {part:?}: {message}"
        );
    }
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace.name());
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace.name());
    ensure!(
        daemon_sets.get_opt("shoal-agent-intruder").await?.is_none()
            && service_accounts
                .get_opt("shoal-agent-intruder")
                .await?
                .is_none(),
        "nothing may be applied for a refused pool"
    );

    // Fixed (the official image, a NoSchedule toleration of its own key, edge
    // nodes): the same pool is served.
    pools
        .patch(
            "intruder",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": {
                "nodeSelector": { "matchLabels": {
                    "node-role.kubernetes.io/control-plane": null,
                    POOL_LABEL: "policy-fixed",
                } },
                "tolerations": [{ "key": KWOK_NODE_KEY, "operator": "Exists", "effect": "NoSchedule" }],
                "agent": { "image": null },
            } })),
        )
        .await?;
    wait_for(&daemon_sets, "shoal-agent-intruder", WAIT, |_| true)
        .await
        .context("the fixed pool's DaemonSet")?;

    operator.stop().await?;
    namespace.delete().await
}
