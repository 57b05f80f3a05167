//! What a node must serve, decided from the cluster's objects alone, and the ETag
//! that names one answer. Pure: no I/O, no clock; the long-poll handler calls it.

use crate::artifacts::digest_hex;
use crate::placement::cohort::CanaryOrder;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use sha2::{Digest, Sha256};
use shoal_api::agent_protocol::{AssignedModel, Assignment, artifact_path};
use shoal_api::{EdgePool, Model, ModelRollout, ModelVersion};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The models `node` must serve, from the `pools` its agent answers for.
///
/// - A node belongs to a pool when the pool's nodeSelector matches its labels.
/// - A ModelRollout assigns its model to every node of every pool in `spec.pools`
///   (pools and Model in the rollout's own namespace), following the plan its
///   controller keeps in `status` (see `rollout::steps`): a node is a canary when,
///   in one of its pools, it ranks among the `status.pools[].updated` lowest
///   (`rollout::cohort`) while `status.canaryVersion` is set; a canary gets the
///   canary version, every other node `status.stableVersion` — each only once Ready
///   in the Model's `status.versions`. So an agent is only ever assigned one of the
///   plan's two versions.
/// - `canary_orders` holds each rollout's canary ranking of each pool's nodes
///   ([`canary_orders`] builds it).
/// - When several rollouts assign the same model name to the node, the newest
///   rollout (creationTimestamp, then namespace/name) wins: an agent serves one
///   version per name under `/v2/models/{name}`.
pub fn assignment_for_node(
    node: &str,
    node_labels: &BTreeMap<String, String>,
    pools: &[&EdgePool],
    rollouts: &[&ModelRollout],
    models: &[&Model],
    canary_orders: &CanaryOrders,
) -> Assignment {
    let member_of: BTreeSet<(String, String)> = pools
        .iter()
        .filter(|pool| selector_matches(&pool.spec.node_selector, node_labels))
        .map(|pool| (pool.namespace().unwrap_or_default(), pool.name_any()))
        .collect();

    let mut chosen: BTreeMap<String, (&ModelRollout, AssignedModel)> = BTreeMap::new();
    for rollout in rollouts {
        let namespace = rollout.namespace().unwrap_or_default();
        let node_pools: Vec<&String> = rollout
            .spec
            .pools
            .iter()
            .filter(|pool| member_of.contains(&(namespace.clone(), (*pool).clone())))
            .collect();
        if node_pools.is_empty() {
            continue;
        }
        let Some(model) = models.iter().find(|model| {
            model.namespace().unwrap_or_default() == namespace
                && model.name_any() == rollout.spec.model
        }) else {
            continue;
        };
        let ready = model
            .status
            .as_ref()
            .map_or(&[][..], |status| status.versions.as_slice());
        let Some(version) = version_to_serve(rollout, ready, node, &node_pools, canary_orders)
        else {
            continue;
        };
        let Some(assigned) = assigned_model(&model.name_any(), version) else {
            continue;
        };
        let keep_current = chosen
            .get(&assigned.name)
            .is_some_and(|(current, _)| precedes(current, rollout));
        if !keep_current {
            chosen.insert(assigned.name.clone(), (rollout, assigned));
        }
    }
    Assignment {
        node: node.to_string(),
        models: chosen.into_values().map(|(_, model)| model).collect(),
    }
}

/// Canary orders by rollout and pool, under [`canary_order_key`].
pub type CanaryOrders = BTreeMap<String, Arc<CanaryOrder>>;

/// `namespace/rollout/pool`: the key of a rollout's canary order in one pool.
pub fn canary_order_key(namespace: &str, rollout: &str, pool: &str) -> String {
    format!("{namespace}/{rollout}/{pool}")
}

/// The canary orders of every rollout that has a canary, over the pools it rolls
/// out to; `pool_nodes` holds the node names of each pool by `namespace/pool`.
pub fn canary_orders(
    rollouts: &[&ModelRollout],
    pool_nodes: &BTreeMap<String, Vec<String>>,
) -> CanaryOrders {
    let mut orders = CanaryOrders::new();
    for rollout in rollouts {
        let has_canary = rollout
            .status
            .as_ref()
            .is_some_and(|status| status.canary_version.is_some());
        if !has_canary {
            continue;
        }
        let namespace = rollout.namespace().unwrap_or_default();
        let name = rollout.name_any();
        for pool in &rollout.spec.pools {
            let Some(members) = pool_nodes.get(&format!("{namespace}/{pool}")) else {
                continue;
            };
            let order = CanaryOrder::new(&namespace, &name, members.iter().map(String::as_str));
            orders.insert(canary_order_key(&namespace, &name, pool), Arc::new(order));
        }
    }
    orders
}

/// Whether a pool's nodeSelector selects a node with these labels. A selector that
/// selects everything, or that cannot be parsed, selects nothing: the schema
/// forbids the first, and the EdgePool controller reports the second.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    node_selector(selector).is_some_and(|selector| selector.matches(labels))
}

/// A pool's nodeSelector ready to match many nodes; None when it selects nothing
/// (see [`selector_matches`]).
pub fn node_selector(selector: &LabelSelector) -> Option<Selector> {
    Selector::try_from(selector.clone())
        .ok()
        .filter(|selector| !selector.selects_all())
}

fn version_to_serve<'a>(
    rollout: &ModelRollout,
    ready: &'a [ModelVersion],
    node: &str,
    node_pools: &[&String],
    canary_orders: &CanaryOrders,
) -> Option<&'a ModelVersion> {
    let status = rollout.status.as_ref()?;
    let find = |wanted: &str| ready.iter().find(|entry| entry.version == wanted);
    let stable = status.stable_version.as_deref().and_then(find);
    let Some(canary) = status.canary_version.as_deref().and_then(find) else {
        return stable;
    };
    let namespace = rollout.namespace().unwrap_or_default();
    let name = rollout.name_any();
    let is_canary = node_pools.iter().any(|pool| {
        let updated = status
            .pools
            .iter()
            .find(|progress| &&progress.pool == pool)
            .map_or(0, |progress| progress.updated.max(0) as usize);
        canary_orders
            .get(&canary_order_key(&namespace, &name, pool))
            .is_some_and(|order| order.is_canary(node, updated))
    });
    if is_canary { Some(canary) } else { stable }
}

/// None when the status holds a digest agents could not download or verify.
fn assigned_model(name: &str, version: &ModelVersion) -> Option<AssignedModel> {
    let hex = digest_hex(&version.artifact_digest);
    let well_formed = version.artifact_digest.starts_with("sha256:")
        && hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then(|| AssignedModel {
        name: name.to_string(),
        version: version.version.clone(),
        artifact_digest: version.artifact_digest.clone(),
        artifact_bytes: version.artifact_bytes,
        download_path: artifact_path(hex),
    })
}

/// True when `current` keeps precedence over `other`: it is newer, or as new and
/// first by namespace/name.
fn precedes(current: &ModelRollout, other: &ModelRollout) -> bool {
    let created = |rollout: &ModelRollout| rollout.creation_timestamp().map(|time| time.0);
    let key =
        |rollout: &ModelRollout| (rollout.namespace().unwrap_or_default(), rollout.name_any());
    match created(current).cmp(&created(other)) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => key(current) <= key(other),
    }
}

/// The ETag of an assignment: a strong, quoted hash of its JSON. The JSON is
/// canonical because fields serialize in declaration order and models are sorted.
pub fn assignment_etag(assignment: &Assignment) -> String {
    // Serializing plain strings and numbers cannot fail; an empty body would still
    // give a stable tag.
    let json = serde_json::to_vec(assignment).unwrap_or_default();
    let digest = Sha256::digest(&json);
    format!("\"{}\"", hex::encode(&digest[..16]))
}

/// Whether an `If-None-Match` header value names `etag` (RFC 9110 weak comparison:
/// `W/` prefixes are ignored; `*` matches anything).
pub fn etag_matches(if_none_match: Option<&str>, etag: &str) -> bool {
    let Some(header) = if_none_match else {
        return false;
    };
    header.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORE_NODE: &[(&str, &str)] = &[("site", "store")];
    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn pool(namespace: &str, name: &str, selector: &str) -> EdgePool {
        serde_yaml::from_str(&format!(
            "apiVersion: shoal.dev/v1alpha1\nkind: EdgePool\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  nodeSelector: {selector}\n"
        ))
        .expect("test pool parses")
    }

    /// `versions` is `version=hex` pairs, all Ready.
    fn model(namespace: &str, name: &str, versions: &[(&str, &str)]) -> Model {
        let mut model: Model = serde_yaml::from_str(&format!(
            "apiVersion: shoal.dev/v1alpha1\nkind: Model\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  version: x\n  source: {{configMap: {{name: m, key: k}}}}\n"
        ))
        .expect("test model parses");
        model.status = Some(shoal_api::ModelStatus {
            versions: versions
                .iter()
                .map(|(version, hex)| ModelVersion {
                    version: version.to_string(),
                    artifact_digest: format!("sha256:{hex}"),
                    artifact_bytes: 100,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        model
    }

    struct RolloutFixture<'a> {
        namespace: &'a str,
        name: &'a str,
        model: &'a str,
        version: &'a str,
        pools: &'a [&'a str],
        stable: Option<&'a str>,
        /// status.canaryVersion is `version`.
        canary: bool,
        /// status.pools[stores].updated.
        updated: i32,
        created: &'a str,
    }

    const ROLLOUT: RolloutFixture<'static> = RolloutFixture {
        namespace: "shop",
        name: "ranker-rollout",
        model: "ranker",
        version: "2.0",
        pools: &["stores"],
        stable: None,
        canary: true,
        updated: 1,
        created: "2025-01-01T00:00:00Z",
    };

    fn rollout(fixture: RolloutFixture) -> ModelRollout {
        let mut rollout: ModelRollout = serde_yaml::from_str(&format!(
            "apiVersion: shoal.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: {}, namespace: {}, creationTimestamp: '{}'}}\nspec:\n  model: {}\n  version: '{}'\n  pools: [{}]\n",
            fixture.name,
            fixture.namespace,
            fixture.created,
            fixture.model,
            fixture.version,
            fixture.pools.join(", "),
        ))
        .expect("test rollout parses");
        rollout.status = Some(shoal_api::ModelRolloutStatus {
            stable_version: fixture.stable.map(str::to_string),
            canary_version: fixture.canary.then(|| fixture.version.to_string()),
            pools: vec![shoal_api::PoolProgress {
                pool: "stores".into(),
                updated: fixture.updated,
                ..Default::default()
            }],
            ..Default::default()
        });
        rollout
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// (name, version, hex) of each assigned model.
    fn served(
        node_labels: &[(&str, &str)],
        pools: &[EdgePool],
        rollouts: &[ModelRollout],
        models: &[Model],
    ) -> Vec<(String, String, String)> {
        let pools: Vec<&EdgePool> = pools.iter().collect();
        let rollouts: Vec<&ModelRollout> = rollouts.iter().collect();
        let models: Vec<&Model> = models.iter().collect();
        let pool_nodes = BTreeMap::from([
            ("shop/stores".to_string(), vec!["n1".to_string()]),
            ("other/stores".to_string(), vec!["n1".to_string()]),
        ]);
        let assignment = assignment_for_node(
            "n1",
            &labels(node_labels),
            &pools,
            &rollouts,
            &models,
            &canary_orders(&rollouts, &pool_nodes),
        );
        assert_eq!(assignment.node, "n1");
        assignment
            .models
            .into_iter()
            .map(|m| {
                assert_eq!(
                    m.download_path,
                    artifact_path(digest_hex(&m.artifact_digest))
                );
                (
                    m.name,
                    m.version,
                    digest_hex(&m.artifact_digest).to_string(),
                )
            })
            .collect()
    }

    fn entry(name: &str, version: &str, hex: &str) -> (String, String, String) {
        (name.to_string(), version.to_string(), hex.to_string())
    }

    #[test]
    fn assignment_table() {
        let stores = || pool("shop", "stores", "{matchLabels: {site: store}}");
        let ranker_1_2 = || model("shop", "ranker", &[("1.0", A), ("2.0", B)]);
        let ranker_1 = || model("shop", "ranker", &[("1.0", A)]);

        struct Case {
            what: &'static str,
            node: &'static [(&'static str, &'static str)],
            pools: Vec<EdgePool>,
            rollouts: Vec<ModelRollout>,
            models: Vec<Model>,
            want: Vec<(String, String, String)>,
        }
        let cases = vec![
            Case {
                what: "the canary cohort covers the pool: the canary version",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![rollout(ROLLOUT)],
                models: vec![ranker_1_2()],
                want: vec![entry("ranker", "2.0", B)],
            },
            Case {
                what: "node outside the pool gets nothing",
                node: &[("site", "warehouse")],
                pools: vec![stores()],
                rollouts: vec![rollout(ROLLOUT)],
                models: vec![ranker_1_2()],
                want: vec![],
            },
            Case {
                what: "canary not Ready and no stable version: nothing",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![rollout(ROLLOUT)],
                models: vec![ranker_1()],
                want: vec![],
            },
            Case {
                what: "canary not Ready: keeps the stable version",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![rollout(RolloutFixture {
                    stable: Some("1.0"),
                    ..ROLLOUT
                })],
                models: vec![ranker_1()],
                want: vec![entry("ranker", "1.0", A)],
            },
            Case {
                what: "outside the canary cohort (updated 0): the stable version",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![rollout(RolloutFixture {
                    updated: 0,
                    stable: Some("1.0"),
                    ..ROLLOUT
                })],
                models: vec![ranker_1_2()],
                want: vec![entry("ranker", "1.0", A)],
            },
            Case {
                what: "no plan in status yet: nothing",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![rollout(RolloutFixture {
                    canary: false,
                    ..ROLLOUT
                })],
                models: vec![ranker_1_2()],
                want: vec![],
            },
            Case {
                what: "rollout for another pool",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![rollout(RolloutFixture {
                    pools: &["warehouses"],
                    ..ROLLOUT
                })],
                models: vec![ranker_1_2()],
                want: vec![],
            },
            Case {
                what: "pool of the same name in another namespace does not count",
                node: STORE_NODE,
                pools: vec![pool("other", "stores", "{matchLabels: {site: store}}")],
                rollouts: vec![rollout(ROLLOUT)],
                models: vec![ranker_1_2()],
                want: vec![],
            },
            Case {
                what: "model of the same name in another namespace does not count",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![rollout(ROLLOUT)],
                models: vec![model("other", "ranker", &[("2.0", B)])],
                want: vec![],
            },
            Case {
                what: "matchExpressions select too",
                node: &[("region", "eu"), ("tier", "edge")],
                pools: vec![pool(
                    "shop",
                    "stores",
                    "{matchExpressions: [{key: region, operator: In, values: [eu, us]}, {key: gpu, operator: DoesNotExist}]}",
                )],
                rollouts: vec![rollout(ROLLOUT)],
                models: vec![ranker_1_2()],
                want: vec![entry("ranker", "2.0", B)],
            },
            Case {
                what: "an empty selector selects nothing",
                node: STORE_NODE,
                pools: vec![pool("shop", "stores", "{}")],
                rollouts: vec![rollout(ROLLOUT)],
                models: vec![ranker_1_2()],
                want: vec![],
            },
            Case {
                what: "two models, sorted by name",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![
                    rollout(ROLLOUT),
                    rollout(RolloutFixture {
                        name: "fraud-rollout",
                        model: "fraud",
                        version: "7",
                        ..ROLLOUT
                    }),
                ],
                models: vec![ranker_1_2(), model("shop", "fraud", &[("7", C)])],
                want: vec![entry("fraud", "7", C), entry("ranker", "2.0", B)],
            },
            Case {
                what: "two rollouts of one model: the newer wins",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![
                    rollout(RolloutFixture {
                        name: "newer",
                        version: "1.0",
                        created: "2025-02-01T00:00:00Z",
                        ..ROLLOUT
                    }),
                    rollout(RolloutFixture {
                        name: "older",
                        version: "2.0",
                        ..ROLLOUT
                    }),
                ],
                models: vec![ranker_1_2()],
                want: vec![entry("ranker", "1.0", A)],
            },
            Case {
                what: "two rollouts created at once: the first by name wins",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![
                    rollout(RolloutFixture {
                        name: "b",
                        version: "1.0",
                        ..ROLLOUT
                    }),
                    rollout(RolloutFixture {
                        name: "a",
                        version: "2.0",
                        ..ROLLOUT
                    }),
                ],
                models: vec![ranker_1_2()],
                want: vec![entry("ranker", "2.0", B)],
            },
            Case {
                what: "a malformed digest in status is never assigned",
                node: STORE_NODE,
                pools: vec![stores()],
                rollouts: vec![rollout(ROLLOUT)],
                models: vec![model("shop", "ranker", &[("2.0", "not-hex")])],
                want: vec![],
            },
        ];
        for case in cases {
            let got = served(case.node, &case.pools, &case.rollouts, &case.models);
            assert_eq!(got, case.want, "{}", case.what);
        }
    }

    #[test]
    fn canaries_are_the_lowest_ranked_nodes_of_the_pool() {
        let stores = pool("shop", "stores", "{matchLabels: {site: store}}");
        let ranker = model("shop", "ranker", &[("1.0", A), ("2.0", B)]);
        let plan = rollout(RolloutFixture {
            stable: Some("1.0"),
            updated: 3,
            ..ROLLOUT
        });
        let names: Vec<String> = (0..10).map(|i| format!("store-{i}")).collect();
        let pool_nodes = BTreeMap::from([("shop/stores".to_string(), names.clone())]);
        let orders = canary_orders(&[&plan], &pool_nodes);
        let mut canaries: Vec<&str> = names
            .iter()
            .filter(|node| {
                let assignment = assignment_for_node(
                    node,
                    &labels(STORE_NODE),
                    &[&stores],
                    &[&plan],
                    &[&ranker],
                    &orders,
                );
                let version = &assignment.models[0].version;
                assert!(
                    version == "1.0" || version == "2.0",
                    "only the plan's versions"
                );
                version == "2.0"
            })
            .map(String::as_str)
            .collect();
        canaries.sort();
        let order = CanaryOrder::new("shop", "ranker-rollout", names.iter().map(String::as_str));
        let mut expected: Vec<&str> = order.nodes().take(3).collect();
        expected.sort();
        assert_eq!(canaries, expected);
    }

    #[test]
    fn etag_follows_content_only() {
        let empty = Assignment {
            node: "n1".into(),
            models: vec![],
        };
        let one = Assignment {
            node: "n1".into(),
            models: vec![AssignedModel {
                name: "m".into(),
                version: "1".into(),
                artifact_digest: format!("sha256:{A}"),
                artifact_bytes: 1,
                download_path: artifact_path(A),
            }],
        };
        assert_eq!(assignment_etag(&empty), assignment_etag(&empty.clone()));
        assert_ne!(assignment_etag(&empty), assignment_etag(&one));
        let tag = assignment_etag(&one);
        assert!(
            tag.starts_with('"') && tag.ends_with('"') && tag.len() == 34,
            "{tag}"
        );
    }

    #[test]
    fn if_none_match_forms() {
        let tag = "\"abc\"";
        assert!(!etag_matches(None, tag));
        assert!(etag_matches(Some("\"abc\""), tag));
        assert!(etag_matches(Some("W/\"abc\""), tag));
        assert!(etag_matches(Some("\"x\", \"abc\""), tag));
        assert!(etag_matches(Some("*"), tag));
        assert!(!etag_matches(Some("\"abcd\""), tag));
        assert!(!etag_matches(Some("abc"), tag));
        assert!(!etag_matches(Some(""), tag));
    }
}
