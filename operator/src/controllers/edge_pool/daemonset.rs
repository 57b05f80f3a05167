//! Builds the agent objects of an EdgePool: the DaemonSet that runs one
//! `shoal-agent` pod per node the pool selects, its ServiceAccount, CA ConfigMap and
//! Service. Pure: the same pool and settings always give the same objects, which
//! the EdgePool controller then server-side applies.

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, SecurityContext, Service, ServiceAccount,
    ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
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
pub use shoal_api::agent_protocol::TOKEN_AUDIENCE as AGENT_TOKEN_AUDIENCE;
const TOKEN_DIR: &str = "/var/run/secrets/shoal";
const CACHE_DIR: &str = "/var/cache/shoal";
/// The uid and gid the agent runs as: distroless's `nonroot`, the image's USER.
pub const AGENT_UID: i64 = 65532;
/// Name of the agent container's serving port (inference and /metrics), which the
/// Service targets.
const PORT_NAME: &str = "inference";

/// The startup probe checks every `STARTUP_PERIOD_SECONDS` and gives up after
/// `STARTUP_FAILURES` misses: 5 minutes. The agent's HTTP server listens only
/// once the models of its cached last-known-good assignment are loaded and warmed
/// up, which for a few large models on a small edge CPU takes minutes; until then
/// every probe finds the port closed. Until this probe passes, the liveness
/// probe does not run, so a slow load is not killed half-way into a restart loop;
/// once it passes, liveness catches a hung agent within 30 s as before.
const STARTUP_PERIOD_SECONDS: i32 = 5;
const STARTUP_FAILURES: i32 = 60;

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
    shoal_api::agent_protocol::agent_account_name(pool_name)
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

/// The labels that select a pool's agent pods: the DaemonSet's selector and the
/// Service's. A subset of [`agent_labels`], and never changed, because a
/// DaemonSet's selector is immutable.
fn selector_labels(pool_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "shoal-agent".to_string(),
        ),
        (POOL_LABEL.to_string(), pool_name.to_string()),
    ])
}

/// The name of a pool's Service, `shoal-agent-<pool>` like its DaemonSet, when
/// that is a valid Service name (a DNS-1035 label of at most 63 characters). A
/// pool's name may be a DNS subdomain (dots, up to 253 characters), so for some
/// pools there is none; they keep their agents, and get no Service.
pub fn service_name(pool_name: &str) -> Option<String> {
    let name = daemon_set_name(pool_name);
    let valid = name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    valid.then_some(name)
}

/// The Service in front of a pool's agents, owned by the pool; None when the
/// pool's name cannot name one (see [`service_name`]). `internalTrafficPolicy:
/// Local` sends an app's request to the agent on the app's own node, which serves
/// from its own cache and keeps working while the WAN is down; an app on a node
/// without a ready agent gets no answer rather than one from another store.
pub fn build_service(pool: &EdgePool) -> Option<Service> {
    let pool_name = pool.name_any();
    let name = service_name(&pool_name)?;
    Some(Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: pool.namespace(),
            labels: Some(agent_labels(&pool_name)),
            owner_references: Some(pool.controller_owner_ref(&()).into_iter().collect()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            internal_traffic_policy: Some("Local".into()),
            selector: Some(selector_labels(&pool_name)),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: pool.spec.agent.port_or_default(),
                target_port: Some(IntOrString::String(PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
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
            name: Some(PORT_NAME.into()),
            container_port: port,
            host_port: agent.host_port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: agent.resources.clone(),
        // Live, not ready: an agent with an empty cache whose operator is out of
        // reach is rightly not ready, and must not be restarted for that.
        startup_probe: Some(Probe {
            period_seconds: Some(STARTUP_PERIOD_SECONDS),
            failure_threshold: Some(STARTUP_FAILURES),
            ..http_probe("/v2/health/live", port)
        }),
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

    // The kubelet creates the hostPath below as root:root 0755 and fsGroup does
    // not apply to hostPath, so the agent could not write its cache: this gives
    // that one directory to the agent's user first, as root with CHOWN alone
    // (root owns the directory, so neither FOWNER nor DAC_OVERRIDE is needed).
    // Same image: nothing else to pull or trust. Same resources as the agent, so
    // the pod's requests stay the same and a quota that wants limits accepts it.
    let prepare_cache = Container {
        name: "prepare-cache".into(),
        image: Some(agent.image_or_default()),
        image_pull_policy: agent.image_pull_policy.clone(),
        args: Some(vec![
            "prepare-cache".into(),
            "--dir".into(),
            CACHE_DIR.into(),
            "--owner".into(),
            format!("{AGENT_UID}:{AGENT_UID}"),
        ]),
        resources: agent.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: "model-cache".into(),
            mount_path: CACHE_DIR.into(),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["CHOWN".into()]),
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
                match_labels: Some(selector_labels(&pool_name)),
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
                    init_containers: Some(vec![prepare_cache]),
                    containers: vec![container],
                    volumes: Some(volumes),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(AGENT_UID),
                        run_as_group: Some(AGENT_UID),
                        fs_group: Some(AGENT_UID),
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

    fn pod_spec(pool: &EdgePool) -> PodSpec {
        build_daemon_set(pool, &defaults())
            .expect("builds")
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod spec")
    }

    #[test]
    fn an_init_container_gives_the_cache_to_the_agent_with_chown_alone() {
        let pod = pod_spec(&pool(STORES));
        let init = pod.init_containers.as_ref().expect("init containers");
        assert_eq!(init.len(), 1);
        let prepare = &init[0];
        let agent = &pod.containers[0];
        assert_eq!(
            prepare.image, agent.image,
            "same image, nothing else to pull"
        );
        assert_eq!(
            prepare.args.as_deref().expect("args"),
            [
                "prepare-cache",
                "--dir",
                "/var/cache/shoal",
                "--owner",
                "65532:65532"
            ]
        );
        // The directory it prepares is the one the agent uses.
        let cache_mount = |c: &Container| {
            c.volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "model-cache")
                .map(|m| m.mount_path.clone())
        };
        assert_eq!(cache_mount(prepare).as_deref(), Some("/var/cache/shoal"));
        assert_eq!(cache_mount(prepare), cache_mount(agent));
        assert!(
            agent
                .args
                .as_ref()
                .expect("args")
                .windows(2)
                .any(|w| w == ["--cache-dir", "/var/cache/shoal"])
        );
        let root = prepare.security_context.as_ref().expect("security context");
        assert_eq!(
            (root.run_as_user, root.run_as_non_root),
            (Some(0), Some(false))
        );
        assert_eq!(root.allow_privilege_escalation, Some(false));
        assert_eq!(root.read_only_root_filesystem, Some(true));
        let caps = root.capabilities.as_ref().expect("capabilities");
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(caps.add.as_deref(), Some(&["CHOWN".to_string()][..]));

        // The agent itself stays non-root with no capability at all.
        let agent_security = agent.security_context.as_ref().expect("security context");
        assert_eq!(agent_security.run_as_non_root, Some(true));
        assert_eq!(agent_security.run_as_user, None, "the pod's 65532");
        let caps = agent_security.capabilities.as_ref().expect("capabilities");
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(caps.add, None);
        let pod_security = pod.security_context.as_ref().expect("pod security");
        assert_eq!(pod_security.run_as_user, Some(AGENT_UID));
        assert_eq!(pod_security.run_as_non_root, Some(true));
    }

    #[test]
    fn a_slow_load_from_the_cache_gets_five_minutes_before_liveness_counts() {
        let pod = pod_spec(&pool(STORES));
        let agent = &pod.containers[0];
        let path = |probe: &Probe| {
            probe
                .http_get
                .as_ref()
                .and_then(|g| g.path.clone())
                .unwrap_or_default()
        };
        let startup = agent.startup_probe.as_ref().expect("startup probe");
        assert_eq!(path(startup), "/v2/health/live");
        let budget = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
        assert!(budget >= 300, "{budget} s to load");
        assert_eq!(
            startup.http_get.as_ref().map(|g| g.port.clone()),
            Some(IntOrString::Int(9000))
        );
        let liveness = agent.liveness_probe.as_ref().expect("liveness probe");
        assert_eq!(path(liveness), "/v2/health/live");
        let detection =
            liveness.period_seconds.unwrap_or(10) * liveness.failure_threshold.unwrap_or(3);
        assert!(detection <= 60, "a hung agent is restarted within a minute");
        let readiness = agent.readiness_probe.as_ref().expect("readiness probe");
        assert_eq!(path(readiness), "/v2/health/ready");
    }

    #[test]
    fn a_host_port_is_bound_only_when_asked_for() {
        let pod = pod_spec(&pool(STORES));
        let port = &pod.containers[0].ports.as_ref().expect("ports")[0];
        assert_eq!(port.host_port, None);
        let with_host_port = pool(&STORES.replace("port: 9000", "port: 9000\n    hostPort: 9100"));
        assert_eq!(with_host_port.spec.agent.host_port, Some(9100));
        let pod = pod_spec(&with_host_port);
        let port = &pod.containers[0].ports.as_ref().expect("ports")[0];
        assert_eq!((port.container_port, port.host_port), (9000, Some(9100)));
    }

    #[test]
    fn the_service_selects_the_pools_agents_on_the_callers_node() {
        let pool = pool(STORES);
        let service = build_service(&pool).expect("a Service");
        assert_eq!(service.metadata.name.as_deref(), Some("shoal-agent-stores"));
        assert_eq!(service.metadata.namespace.as_deref(), Some("retail"));
        let owner = &service.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("EdgePool", "stores", Some(true))
        );
        let spec = service.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));

        let ds = build_daemon_set(&pool, &defaults()).expect("builds");
        let ds_spec = ds.spec.as_ref().expect("spec");
        assert_eq!(spec.selector, ds_spec.selector.match_labels);
        let pod_labels = ds_spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .expect("labels");
        for (key, value) in spec.selector.iter().flatten() {
            assert_eq!(pod_labels.get(key), Some(value), "pods carry {key}");
        }

        let ports = spec.ports.as_ref().expect("ports");
        let container_ports = ds_spec.template.spec.as_ref().expect("pod").containers[0]
            .ports
            .clone()
            .expect("container ports");
        assert_eq!(ports.len(), container_ports.len(), "every serving port");
        assert_eq!(ports[0].name.as_deref(), Some("inference"));
        assert_eq!(ports[0].port, 9000);
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String("inference".into()))
        );
        assert_eq!(
            container_ports[0].name, ports[0].name,
            "targetPort names the container port"
        );
    }

    #[test]
    fn a_pool_name_that_cannot_name_a_service_gets_none() {
        assert_eq!(
            service_name("stores").as_deref(),
            Some("shoal-agent-stores")
        );
        assert_eq!(service_name(&"a".repeat(51)).map(|n| n.len()), Some(63));
        assert_eq!(service_name(&"a".repeat(52)), None, "longer than 63");
        assert_eq!(service_name("store.eu"), None, "dots");
        let mut dotted = pool(STORES);
        dotted.metadata.name = Some("store.eu".into());
        assert!(build_service(&dotted).is_none());
        assert!(
            build_daemon_set(&dotted, &defaults()).is_ok(),
            "the agents still run"
        );
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
