//! Builds the agent DaemonSet of an EdgePool: one `shoal-agent` pod per node the
//! pool selects. Pure: the same pool and settings always give the same object,
//! which the EdgePool controller then server-side applies.

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, SecurityContext, ServiceAccount,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::ResourceExt;
use shoal_api::EdgePool;
use std::collections::BTreeMap;

/// Label every agent pod and DaemonSet carries with its pool's name.
pub const POOL_LABEL: &str = "shoal.dev/pool";
/// Audience of the projected service-account token the agent presents to the operator.
pub const AGENT_TOKEN_AUDIENCE: &str = "shoal";
const TOKEN_DIR: &str = "/var/run/secrets/shoal";
const CACHE_DIR: &str = "/var/cache/shoal";

/// Where agents find the operator; from operator flags.
#[derive(Clone, Debug)]
pub struct AgentDefaults {
    /// URL of the operator's agent API as seen from an edge node.
    pub control_plane_url: String,
    /// PEM of the CA that signed the agent API's certificate, when agents cannot
    /// verify it with public roots (a private or cert-manager CA). Put in a
    /// ConfigMap per pool and passed to the agents as `--control-plane-ca`.
    pub control_plane_ca: Option<String>,
}

const CA_DIR: &str = "/etc/shoal/ca";
const CA_KEY: &str = "ca.crt";

/// The name of a pool's CA ConfigMap: `shoal-agent-<pool>-ca`.
pub fn ca_config_map_name(pool_name: &str) -> String {
    format!("shoal-agent-{pool_name}-ca")
}

/// The ConfigMap holding the agent API's CA for a pool's agents, owned by the pool.
pub fn build_ca_config_map(pool: &EdgePool, ca_pem: &str) -> ConfigMap {
    let pool_name = pool.name_any();
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(ca_config_map_name(&pool_name)),
            namespace: pool.namespace(),
            labels: Some(agent_labels(&pool_name)),
            owner_references: Some(pool.controller_owner_ref(&()).into_iter().collect()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CA_KEY.to_string(), ca_pem.to_string())])),
        ..Default::default()
    }
}

/// The name of a pool's DaemonSet and ServiceAccount: `shoal-agent-<pool>`.
pub fn daemon_set_name(pool_name: &str) -> String {
    format!("shoal-agent-{pool_name}")
}

/// The ServiceAccount a pool's agents run as. Its projected token (audience
/// `shoal`) is the agent's identity towards the operator; it is granted no
/// Kubernetes permissions. One per pool, owned by the pool, so it goes with it.
pub fn build_service_account(pool: &EdgePool) -> ServiceAccount {
    let pool_name = pool.name_any();
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(daemon_set_name(&pool_name)),
            namespace: pool.namespace(),
            labels: Some(agent_labels(&pool_name)),
            owner_references: Some(pool.controller_owner_ref(&()).into_iter().collect()),
            ..Default::default()
        },
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

fn agent_labels(pool_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "shoal-agent".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            pool_name.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "shoal-operator".to_string(),
        ),
        (POOL_LABEL.to_string(), pool_name.to_string()),
    ])
}

/// Why a pool's selector cannot become a pod's node placement.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "spec.nodeSelector.matchExpressions[{index}]: operator {operator:?} is not one of In, NotIn, Exists, DoesNotExist"
)]
pub struct UnsupportedSelector {
    pub index: usize,
    pub operator: String,
}

/// The DaemonSet that runs this pool's agents, owned by the pool.
pub fn build_daemon_set(
    pool: &EdgePool,
    defaults: &AgentDefaults,
) -> Result<DaemonSet, UnsupportedSelector> {
    let pool_name = pool.name_any();
    let agent = &pool.spec.agent;
    let port = agent.port_or_default();
    let labels = agent_labels(&pool_name);
    let selector_labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "shoal-agent".to_string(),
        ),
        (POOL_LABEL.to_string(), pool_name.clone()),
    ]);
    let (node_selector, affinity) = node_placement(&pool.spec.node_selector)?;

    let mut env = vec![EnvVar {
        name: "NODE_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "spec.nodeName".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    env.extend(agent.env.iter().cloned());

    let cache_bytes = agent.cache_size_or_default().0;
    let mut args = vec![
        "--control-plane".into(),
        defaults.control_plane_url.clone(),
        "--node".into(),
        "$(NODE_NAME)".into(),
        "--token-file".into(),
        format!("{TOKEN_DIR}/token"),
        "--cache-dir".into(),
        CACHE_DIR.into(),
        "--cache-size".into(),
        cache_bytes,
        "--listen".into(),
        format!("0.0.0.0:{port}"),
    ];
    let mut volume_mounts = vec![
        VolumeMount {
            name: "model-cache".into(),
            mount_path: CACHE_DIR.into(),
            ..Default::default()
        },
        VolumeMount {
            name: "shoal-token".into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    if defaults.control_plane_ca.is_some() {
        args.push("--control-plane-ca".into());
        args.push(format!("{CA_DIR}/{CA_KEY}"));
        volume_mounts.push(VolumeMount {
            name: "control-plane-ca".into(),
            mount_path: CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let container = Container {
        name: "agent".into(),
        image: Some(agent.image_or_default()),
        image_pull_policy: agent.image_pull_policy.clone(),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("inference".into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: agent.resources.clone(),
        readiness_probe: Some(http_probe("/v2/health/ready", port)),
        liveness_probe: Some(http_probe("/v2/health/live", port)),
        volume_mounts: Some(volume_mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let namespace = pool.namespace().unwrap_or_default();
    let mut volumes = vec![
        // The cache must outlive the pod: an agent restarted while the WAN is down
        // serves its last-known-good models from here.
        Volume {
            name: "model-cache".into(),
            host_path: Some(HostPathVolumeSource {
                path: format!("/var/lib/shoal-agent/{namespace}/{pool_name}"),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        },
        Volume {
            name: "shoal-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(AGENT_TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];

    if defaults.control_plane_ca.is_some() {
        volumes.push(Volume {
            name: "control-plane-ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca_config_map_name(&pool_name),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    let owner = pool
        .controller_owner_ref(&())
        .into_iter()
        .collect::<Vec<_>>();
    Ok(DaemonSet {
        metadata: ObjectMeta {
            name: Some(daemon_set_name(&pool_name)),
            namespace: pool.namespace(),
            labels: Some(labels.clone()),
            owner_references: Some(owner),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels),
                ..Default::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::String("10%".into())),
                    ..Default::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(daemon_set_name(&pool_name)),
                    automount_service_account_token: Some(false),
                    node_selector,
                    affinity,
                    tolerations: Some(pool.spec.tolerations.clone()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn http_probe(path: &str, port: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// A pod's `nodeSelector` takes only exact labels, so a pool's `matchLabels`
/// become the pod's nodeSelector and its `matchExpressions` a required node
/// affinity term (the LabelSelector operators map one to one onto node selector ones).
type NodePlacement = (Option<BTreeMap<String, String>>, Option<Affinity>);

pub fn node_placement(selector: &LabelSelector) -> Result<NodePlacement, UnsupportedSelector> {
    let node_selector = selector
        .match_labels
        .clone()
        .filter(|labels| !labels.is_empty());
    let expressions = selector.match_expressions.clone().unwrap_or_default();
    if expressions.is_empty() {
        return Ok((node_selector, None));
    }
    let mut requirements = Vec::with_capacity(expressions.len());
    for (index, expression) in expressions.into_iter().enumerate() {
        if !matches!(
            expression.operator.as_str(),
            "In" | "NotIn" | "Exists" | "DoesNotExist"
        ) {
            return Err(UnsupportedSelector {
                index,
                operator: expression.operator,
            });
        }
        requirements.push(NodeSelectorRequirement {
            key: expression.key,
            operator: expression.operator,
            values: expression.values,
        });
    }
    let affinity = Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(requirements),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok((node_selector, Some(affinity)))
}

/// The label-selector query string (`a=b,c in (d)`) that lists the Nodes a pool selects.
pub fn label_query(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        parts.push(match expression.operator.as_str() {
            "In" => format!("{} in ({values})", expression.key),
            "NotIn" => format!("{} notin ({values})", expression.key),
            "Exists" => expression.key.clone(),
            _ => format!("!{}", expression.key),
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> EdgePool {
        serde_yaml::from_str(yaml).expect("test pool parses")
    }

    fn defaults() -> AgentDefaults {
        AgentDefaults {
            control_plane_url: "https://shoal.shoal-system.svc:8443".into(),
            control_plane_ca: None,
        }
    }

    const STORES: &str = r#"
apiVersion: shoal.dev/v1alpha1
kind: EdgePool
metadata: {name: stores, namespace: retail, uid: 1234-abcd}
spec:
  nodeSelector:
    matchLabels: {shoal.dev/site: store}
    matchExpressions:
    - {key: topology.kubernetes.io/region, operator: In, values: [eu-west, eu-north]}
  tolerations:
  - {key: edge, operator: Exists, effect: NoSchedule}
  agent:
    port: 9000
    cacheSize: 512Mi
    env: [{name: RUST_LOG, value: debug}]
"#;

    #[test]
    fn daemon_set_places_agents_on_the_selected_nodes() {
        let ds = build_daemon_set(&pool(STORES), &defaults()).expect("builds");
        assert_eq!(ds.metadata.name.as_deref(), Some("shoal-agent-stores"));
        assert_eq!(ds.metadata.namespace.as_deref(), Some("retail"));
        let owner = &ds.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("EdgePool", "stores", Some(true))
        );
        let pod = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec");
        assert_eq!(
            pod.node_selector
                .as_ref()
                .and_then(|s| s.get("shoal.dev/site"))
                .map(String::as_str),
            Some("store")
        );
        let terms = &pod
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("node affinity")
            .node_selector_terms;
        let requirement = &terms[0].match_expressions.as_ref().expect("expressions")[0];
        assert_eq!(requirement.key, "topology.kubernetes.io/region");
        assert_eq!(
            requirement.values.as_deref(),
            Some(&["eu-west".to_string(), "eu-north".to_string()][..])
        );
        let tolerations = pod.tolerations.as_ref().expect("tolerations");
        assert_eq!(tolerations[0].key.as_deref(), Some("edge"));
    }

    #[test]
    fn agent_container_carries_the_pool_settings() {
        let ds = build_daemon_set(&pool(STORES), &defaults()).expect("builds");
        let pod = ds.spec.and_then(|s| s.template.spec).expect("pod spec");
        let agent = &pod.containers[0];
        let args = agent.args.clone().expect("args");
        assert!(
            args.windows(2).any(|w| w == ["--listen", "0.0.0.0:9000"]),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["--cache-size", "512Mi"]),
            "{args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--control-plane" && w[1].starts_with("https://"))
        );
        let env = agent.env.clone().expect("env");
        assert_eq!(env[0].name, "NODE_NAME");
        assert!(env.iter().any(|e| e.name == "RUST_LOG"));
        assert_eq!(agent.ports.as_ref().expect("ports")[0].container_port, 9000);
        let token = pod
            .volumes
            .as_ref()
            .expect("volumes")
            .iter()
            .find(|v| v.name == "shoal-token")
            .expect("token volume");
        let projection = token
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .expect("sources")[0]
            .service_account_token
            .clone()
            .expect("sa token");
        assert_eq!(projection.audience.as_deref(), Some(AGENT_TOKEN_AUDIENCE));
    }

    #[test]
    fn a_private_ca_is_mounted_and_passed_to_the_agents() {
        let pool = pool(STORES);
        let without = build_daemon_set(&pool, &defaults()).expect("builds");
        let spec = without.spec.expect("spec").template.spec.expect("pod spec");
        let args = spec.containers[0].args.clone().expect("args");
        assert!(!args.contains(&"--control-plane-ca".to_string()));
        let with_ca = AgentDefaults {
            control_plane_ca: Some("-----BEGIN CERTIFICATE-----\n".into()),
            ..defaults()
        };
        let daemon_set = build_daemon_set(&pool, &with_ca).expect("builds");
        let spec = daemon_set
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod spec");
        let args = spec.containers[0].args.clone().expect("args");
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--control-plane-ca" && w[1] == "/etc/shoal/ca/ca.crt"),
            "{args:?}"
        );
        let volume = spec
            .volumes
            .expect("volumes")
            .into_iter()
            .find(|v| v.name == "control-plane-ca")
            .expect("CA volume");
        assert_eq!(
            volume.config_map.expect("configMap").name,
            "shoal-agent-stores-ca"
        );
        let config_map = build_ca_config_map(&pool, "PEM");
        assert_eq!(
            config_map.metadata.name.as_deref(),
            Some("shoal-agent-stores-ca")
        );
        assert_eq!(config_map.data.expect("data")["ca.crt"], "PEM");
        assert!(
            config_map
                .metadata
                .owner_references
                .is_some_and(|o| o.len() == 1)
        );
    }

    #[test]
    fn agents_run_as_the_pools_own_service_account() {
        let pool = pool(STORES);
        let account = build_service_account(&pool);
        assert_eq!(account.metadata.name.as_deref(), Some("shoal-agent-stores"));
        assert_eq!(account.automount_service_account_token, Some(false));
        assert_eq!(
            account.metadata.owner_references.as_ref().map(Vec::len),
            Some(1)
        );
        let ds = build_daemon_set(&pool, &defaults()).expect("builds");
        let pod = ds.spec.and_then(|s| s.template.spec).expect("pod spec");
        assert_eq!(pod.service_account_name, account.metadata.name);
    }

    #[test]
    fn match_labels_only_needs_no_affinity() {
        let selector: LabelSelector =
            serde_yaml::from_str("matchLabels: {pool: a}").expect("parses");
        let (labels, affinity) = node_placement(&selector).expect("supported");
        assert_eq!(
            labels.expect("labels").get("pool").map(String::as_str),
            Some("a")
        );
        assert!(affinity.is_none());
    }

    #[test]
    fn unknown_operator_is_rejected_with_its_index() {
        let selector: LabelSelector = serde_yaml::from_str(
            "matchExpressions: [{key: a, operator: Exists}, {key: b, operator: Gt, values: ['1']}]",
        )
        .expect("parses");
        assert_eq!(
            node_placement(&selector),
            Err(UnsupportedSelector {
                index: 1,
                operator: "Gt".into()
            })
        );
    }

    #[test]
    fn label_query_covers_every_operator() {
        let selector: LabelSelector = serde_yaml::from_str(
            "matchLabels: {site: store}\nmatchExpressions:\n- {key: r, operator: In, values: [a, b]}\n- {key: x, operator: NotIn, values: [c]}\n- {key: e, operator: Exists}\n- {key: d, operator: DoesNotExist}",
        )
        .expect("parses");
        assert_eq!(
            label_query(&selector),
            "site=store,r in (a,b),x notin (c),e,!d"
        );
    }
}
