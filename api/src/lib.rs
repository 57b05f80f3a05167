//! Shoal's custom resources (group `shoal.dev`, version `v1alpha1`): `Model`,
//! `EdgePool` and `ModelRollout`, shared by the operator, the agent and the kubectl
//! plugin. Types and pure helpers only: no I/O.

pub mod agent_protocol;
pub mod condition;
pub mod edge_pool;
pub mod model;
pub mod model_rollout;
mod schema;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use crate::condition::{
    ConditionStatus, find_condition, is_condition_true, new_condition, remove_condition,
    set_condition,
};
pub use crate::edge_pool::{
    AgentSettings, EdgePool, EdgePoolSpec, EdgePoolStatus, VersionCount, default_agent_image,
};
pub use crate::model::{
    Compression, CompressionMode, ConfigMapSource, HttpSource, Model, ModelPhase, ModelSource,
    ModelSpec, ModelStatus, ModelVersion, OciSource, TensorSpec, ValidationFigures, ValidationGate,
};
pub use crate::model_rollout::{
    ACTION_ABORT, ACTION_ANNOTATION, ACTION_PROMOTE, AnalysisResult, AnalysisSpec, AnalysisStep,
    CohortFigures, FinishedRollout, ModelRollout, ModelRolloutSpec, ModelRolloutStatus, PauseStep,
    PoolProgress, RolloutPhase, RolloutStep,
};

/// The API group of every Shoal resource.
pub const GROUP: &str = "shoal.dev";
/// The API version of every Shoal resource.
pub const VERSION: &str = "v1alpha1";

/// The CustomResourceDefinitions of all Shoal resources, always in the same order:
/// Model, EdgePool, ModelRollout. These are the ones to install: they are
/// `Model::crd()` and so on with the doc comments' line breaks joined, so that
/// `kubectl explain` can wrap the text itself.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![Model::crd(), EdgePool::crd(), ModelRollout::crd()];
    let schemas = crds
        .iter_mut()
        .flat_map(|crd| crd.spec.versions.iter_mut())
        .filter_map(|version| version.schema.as_mut())
        .filter_map(|schema| schema.open_api_v3_schema.as_mut());
    for schema in schemas {
        schema::unwrap_descriptions(schema);
    }
    crds
}

const CRDS_YAML_HEADER: &str = "\
# Shoal CustomResourceDefinitions (shoal.dev/v1alpha1).
# Generated from the api/ crate by `make crds`; do not edit by hand.
";

/// [`crds`] as one multi-document YAML stream, the content of `crds/shoal.dev.yaml`.
///
/// # Panics
///
/// Never in practice: a `CustomResourceDefinition` is plain data that always renders
/// as YAML.
pub fn crds_yaml() -> String {
    let mut out = String::from(CRDS_YAML_HEADER);
    for crd in crds() {
        let doc = serde_yaml::to_string(&crd)
            .expect("a CustomResourceDefinition always serializes to YAML");
        out.push_str("---\n");
        out.push_str(&doc);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRDS_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/shoal.dev.yaml");

    /// crds/ is checked in; it must be what the types generate. Set
    /// SHOAL_UPDATE_CRDS=1 to rewrite it from the types instead of failing.
    #[test]
    fn crds_dir_is_up_to_date() {
        let generated = crds_yaml();
        if std::env::var_os("SHOAL_UPDATE_CRDS").is_some() {
            std::fs::write(CRDS_FILE, &generated).expect("write crds/shoal.dev.yaml");
            return;
        }
        let checked_in = std::fs::read_to_string(CRDS_FILE).unwrap_or_default();
        assert!(
            checked_in == generated,
            "crds/shoal.dev.yaml is not what api/ generates: run `make crds` \
             (or SHOAL_UPDATE_CRDS=1 cargo test -p shoal-api crds_dir_is_up_to_date) \
             and commit the result"
        );
    }

    #[test]
    fn crds_come_in_a_stable_order() {
        let names: Vec<_> = crds()
            .into_iter()
            .map(|crd| crd.metadata.name.unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "models.shoal.dev",
                "edgepools.shoal.dev",
                "modelrollouts.shoal.dev"
            ]
        );
        for crd in crds() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.versions[0].name, VERSION);
        }
        assert_eq!(crds_yaml(), crds_yaml());
        assert_eq!(crds_yaml().lines().filter(|l| *l == "---").count(), 3);
    }
}
