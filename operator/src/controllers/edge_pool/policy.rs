//! What an EdgePool may ask the operator to run, and where.
//!
//! Whoever may create an EdgePool in a namespace gets a DaemonSet the operator
//! creates with its own rights, not the pool author's: without limits, a pool would
//! be a way to run any image on any node, past the author's own pod permissions and
//! the cluster's taints. So the operator refuses a pool (its agent objects are not
//! applied, status says why) that:
//! - runs an agent image outside the operator's allowed image repositories
//!   (`--allowed-agent-image`, default the official agent repository);
//! - tolerates taints beyond scheduling preferences: a toleration without a key (it
//!   tolerates every taint), one for `NoExecute` or for every effect (an empty
//!   effect), or one for a control-plane taint, unless the operator allows its key
//!   (`--allowed-toleration-key`);
//! - selects control-plane nodes by their role label, unless the operator allows the
//!   key `node-role.kubernetes.io/control-plane`.
//!
//! Pure: the controller calls [`PoolPolicy::refusal`] before building anything.

use k8s_openapi::api::core::v1::Toleration;
use shoal_api::EdgePool;

/// The label and taint keys of control-plane nodes.
pub const CONTROL_PLANE_KEYS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// The operator's limits on pools; from its flags.
#[derive(Debug, Clone)]
pub struct PoolPolicy {
    /// Image repositories (`registry/path`, matched up to a `:tag` or `@digest`) or
    /// prefixes ending in `/` that agent images may come from.
    pub allowed_images: Vec<String>,
    /// Taint keys pools may tolerate without limits (and, for the control-plane
    /// key, select nodes by).
    pub allowed_toleration_keys: Vec<String>,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        PoolPolicy {
            allowed_images: vec![shoal_api::edge_pool::AGENT_IMAGE_REPOSITORY.to_string()],
            allowed_toleration_keys: Vec::new(),
        }
    }
}

impl PoolPolicy {
    /// None when the operator may run the pool's agents as asked; otherwise every
    /// reason it may not, and what to change.
    pub fn refusal(&self, pool: &EdgePool) -> Option<String> {
        let mut problems = Vec::new();
        if let Some(image) = &pool.spec.agent.image
            && !self.image_allowed(image)
        {
            problems.push(format!(
                "spec.agent.image {image:?} is not from an allowed repository ({}); use the \
                 operator's agent image or ask the cluster admin to allow the repository \
                 (shoal-operator --allowed-agent-image, chart value edgePools.allowedAgentImages)",
                self.allowed_images.join(", ")
            ));
        }
        for (index, toleration) in pool.spec.tolerations.iter().enumerate() {
            if let Some(problem) = self.toleration_problem(toleration) {
                problems.push(format!("spec.tolerations[{index}] {problem}"));
            }
        }
        if let Some(key) = selected_control_plane_key(pool)
            && !self.key_allowed(CONTROL_PLANE_KEYS[0])
        {
            problems.push(format!(
                "spec.nodeSelector selects control-plane nodes ({key}); agents run on edge \
                 nodes: select those, or ask the cluster admin to allow the key {} \
                 (--allowed-toleration-key)",
                CONTROL_PLANE_KEYS[0]
            ));
        }
        if problems.is_empty() {
            None
        } else {
            Some(problems.join("; "))
        }
    }

    fn image_allowed(&self, image: &str) -> bool {
        self.allowed_images.iter().any(|allowed| {
            if allowed.ends_with('/') {
                return image.starts_with(allowed.as_str());
            }
            match image.strip_prefix(allowed.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with(':') || rest.starts_with('@'),
                None => false,
            }
        })
    }

    fn key_allowed(&self, key: &str) -> bool {
        self.allowed_toleration_keys.iter().any(|k| k == key)
    }

    fn toleration_problem(&self, toleration: &Toleration) -> Option<String> {
        let key = toleration.key.as_deref().unwrap_or_default();
        if key.is_empty() {
            return Some(
                "has no key, so it tolerates every taint: name the taint's key".to_string(),
            );
        }
        if self.key_allowed(key) {
            return None;
        }
        let allow_hint = format!(
            "ask the cluster admin to allow the key {key} (shoal-operator \
             --allowed-toleration-key, chart value edgePools.allowedTolerationKeys)"
        );
        if CONTROL_PLANE_KEYS.contains(&key) {
            return Some(format!(
                "tolerates the control-plane taint {key}: agents run on edge nodes; {allow_hint}"
            ));
        }
        match toleration.effect.as_deref().unwrap_or_default() {
            "NoSchedule" | "PreferNoSchedule" => None,
            "NoExecute" => Some(format!(
                "tolerates {key} with effect NoExecute, which keeps pods on nodes the cluster \
                 evicts them from; {allow_hint}"
            )),
            _ => Some(format!(
                "tolerates {key} with every effect (no effect given), NoExecute included: set \
                 effect: NoSchedule, or {allow_hint}"
            )),
        }
    }
}

/// The control-plane role label the pool's node selector names, if any: in
/// matchLabels, or in a matchExpressions term that can match it (In, Exists).
fn selected_control_plane_key(pool: &EdgePool) -> Option<&str> {
    let selector = &pool.spec.node_selector;
    let in_labels = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, _)| key.as_str());
    let in_expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .filter(|e| matches!(e.operator.as_str(), "In" | "Exists"))
        .map(|e| e.key.as_str());
    in_labels
        .chain(in_expressions)
        .find(|key| CONTROL_PLANE_KEYS.contains(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> EdgePool {
        serde_yaml::from_str(yaml).expect("pool")
    }

    const STORES: &str = r#"
apiVersion: shoal.dev/v1alpha1
kind: EdgePool
metadata: {name: stores, namespace: retail}
spec:
  nodeSelector: {matchLabels: {shoal.dev/site: store}}
  tolerations:
  - {key: edge, operator: Exists, effect: NoSchedule}
  - {key: dedicated, operator: Equal, value: till, effect: PreferNoSchedule}
  agent: {port: 8000}
"#;

    #[test]
    fn an_ordinary_pool_is_allowed() {
        assert_eq!(PoolPolicy::default().refusal(&pool(STORES)), None);
    }

    #[test]
    fn images_must_come_from_an_allowed_repository() {
        let policy = PoolPolicy {
            allowed_images: vec![
                "ghcr.io/shoal-dev/shoal-agent".into(),
                "registry.internal.example/edge/".into(),
            ],
            allowed_toleration_keys: Vec::new(),
        };
        let with_image = |image: &str| {
            let mut p = pool(STORES);
            p.spec.agent.image = Some(image.into());
            policy.refusal(&p)
        };
        for allowed in [
            "ghcr.io/shoal-dev/shoal-agent",
            "ghcr.io/shoal-dev/shoal-agent:0.4.0",
            "ghcr.io/shoal-dev/shoal-agent@sha256:abcd",
            "registry.internal.example/edge/shoal-agent:1",
        ] {
            assert_eq!(with_image(allowed), None, "{allowed}");
        }
        for refused in [
            "ghcr.io/shoal-dev/shoal-agent-evil:1",
            "ghcr.io/shoal-dev/shoal-agentx",
            "docker.io/library/busybox",
            "registry.internal.example/edgex/agent",
        ] {
            let refusal = with_image(refused).unwrap_or_else(|| panic!("{refused} is refused"));
            assert!(refusal.contains("spec.agent.image"), "{refusal}");
            assert!(refusal.contains("--allowed-agent-image"), "{refusal}");
        }
    }

    #[test]
    fn tolerations_past_scheduling_preferences_need_the_admins_consent() {
        let cases = [
            ("{operator: Exists}", Some("has no key")),
            (
                "{key: '', operator: Exists, effect: NoSchedule}",
                Some("has no key"),
            ),
            (
                "{key: edge, operator: Exists, effect: NoExecute}",
                Some("NoExecute"),
            ),
            ("{key: edge, operator: Exists}", Some("every effect")),
            (
                "{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}",
                Some("control-plane"),
            ),
            ("{key: edge, operator: Exists, effect: NoSchedule}", None),
        ];
        for (toleration, expected) in cases {
            let yaml = STORES.replace(
                "  - {key: edge, operator: Exists, effect: NoSchedule}",
                &format!("  - {toleration}"),
            );
            let refusal = PoolPolicy::default().refusal(&pool(&yaml));
            match expected {
                None => assert_eq!(refusal, None, "{toleration}"),
                Some(part) => {
                    let refusal = refusal.unwrap_or_else(|| panic!("{toleration} is refused"));
                    assert!(refusal.contains("spec.tolerations[0]"), "{refusal}");
                    assert!(refusal.contains(part), "{toleration}: {refusal}");
                }
            }
        }
        // An allowed key lifts the limits for that key only.
        let policy = PoolPolicy {
            allowed_toleration_keys: vec!["edge".into()],
            ..PoolPolicy::default()
        };
        let no_execute = STORES.replace("effect: NoSchedule}", "effect: NoExecute}");
        assert_eq!(policy.refusal(&pool(&no_execute)), None);
        let other = no_execute.replace("key: edge", "key: store");
        assert!(policy.refusal(&pool(&other)).is_some());
    }

    #[test]
    fn control_plane_nodes_are_not_edge_nodes() {
        let by_label = STORES.replace(
            "{matchLabels: {shoal.dev/site: store}}",
            "{matchLabels: {node-role.kubernetes.io/control-plane: ''}}",
        );
        let by_expression = STORES.replace(
            "{matchLabels: {shoal.dev/site: store}}",
            "{matchExpressions: [{key: node-role.kubernetes.io/master, operator: Exists}]}",
        );
        let excluding = STORES.replace(
            "{matchLabels: {shoal.dev/site: store}}",
            "{matchLabels: {shoal.dev/site: store}, matchExpressions: [{key: node-role.kubernetes.io/control-plane, operator: DoesNotExist}]}",
        );
        let policy = PoolPolicy::default();
        for yaml in [&by_label, &by_expression] {
            let refusal = policy.refusal(&pool(yaml)).expect("refused");
            assert!(refusal.contains("selects control-plane nodes"), "{refusal}");
        }
        assert_eq!(policy.refusal(&pool(&excluding)), None);
        let allowing = PoolPolicy {
            allowed_toleration_keys: vec![CONTROL_PLANE_KEYS[0].into()],
            ..PoolPolicy::default()
        };
        assert_eq!(allowing.refusal(&pool(&by_label)), None);
    }

    #[test]
    fn every_problem_is_listed() {
        let yaml = r#"
apiVersion: shoal.dev/v1alpha1
kind: EdgePool
metadata: {name: everything, namespace: retail}
spec:
  nodeSelector: {matchLabels: {node-role.kubernetes.io/control-plane: ''}}
  tolerations: [{operator: Exists}]
  agent: {image: docker.io/attacker/miner:latest}
"#;
        let refusal = PoolPolicy::default().refusal(&pool(yaml)).expect("refused");
        for part in [
            "spec.agent.image",
            "spec.tolerations[0]",
            "control-plane nodes",
        ] {
            assert!(refusal.contains(part), "{part}: {refusal}");
        }
    }
}
