//! Fake nodes that kwok manages: created Ready with a taint only the tests' pools
//! tolerate, labelled so that leftovers of a failed run are easy to remove.

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;

/// Annotation kwok looks for (`--manage-nodes-with-annotation-selector`), and the key
/// of the NoSchedule taint our fake nodes carry.
pub const KWOK_NODE_KEY: &str = "kwok.x-k8s.io/node";
/// Label on every node the tests create: `kubectl delete nodes -l shoal.dev/test-node`
/// removes what a failed run left behind.
pub const TEST_NODE_LABEL: &str = "shoal.dev/test-node";

/// Creates a Node that kwok manages (it becomes Ready, and pods scheduled on it are
/// faked as Running): 4 CPUs, 8Gi, 110 pods, the given labels plus
/// [`TEST_NODE_LABEL`], and a `kwok.x-k8s.io/node=fake:NoSchedule` taint.
pub async fn create_kwok_node(
    client: &Client,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<Node> {
    let mut all_labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    all_labels.insert(TEST_NODE_LABEL.to_string(), "true".to_string());
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": all_labels,
            "annotations": { KWOK_NODE_KEY: "fake" },
        },
        "spec": {
            "taints": [{ "key": KWOK_NODE_KEY, "value": "fake", "effect": "NoSchedule" }],
        },
        "status": {
            "capacity": { "cpu": "4", "memory": "8Gi", "pods": "110" },
            "allocatable": { "cpu": "4", "memory": "8Gi", "pods": "110" },
        },
    }))?;
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("cannot create node {name}"))
}

/// Deletes the given nodes; ones already gone are fine.
pub async fn delete_nodes(client: &Client, names: &[String]) -> anyhow::Result<()> {
    let api = Api::<Node>::all(client.clone());
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("cannot delete node {name}; remove leftovers with `kubectl delete nodes -l {TEST_NODE_LABEL}`")
                });
            }
        }
    }
    Ok(())
}
