//! The models this agent serves: model name to the version currently answering
//! requests. A new version is loaded beside the old one and swapped in
//! atomically; requests already holding the old version finish on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use shoal_api::agent_protocol::{ModelReport, ModelState};

use crate::engine::{LoadError, LoadedModel};
use crate::metrics::{Metrics, VersionStatus};

pub struct ModelRegistry {
    serving: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
    /// Every version being loaded, serving, or that failed to load, for reports.
    statuses: Mutex<BTreeMap<(String, String), VersionStatus>>,
    metrics: Arc<Metrics>,
    /// The agent's assignment (the operator's, or the cached last-known-good one)
    /// names no model: serving nothing is then the right state, not a failure.
    nothing_assigned: AtomicBool,
}

impl ModelRegistry {
    pub fn new(metrics: Arc<Metrics>) -> ModelRegistry {
        ModelRegistry {
            serving: RwLock::new(BTreeMap::new()),
            statuses: Mutex::new(BTreeMap::new()),
            metrics,
            nothing_assigned: AtomicBool::new(false),
        }
    }

    /// Parses, optimizes and warms up one version, without serving it yet.
    /// Blocking and CPU-heavy: call it from `spawn_blocking`. On failure the
    /// version is reported Failed and whatever version serves keeps serving.
    pub fn load_version(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
    ) -> Result<Arc<LoadedModel>, LoadError> {
        self.set_status(name, version, ModelState::Loading, None);
        let started = Instant::now();
        match LoadedModel::load(name, version, bytes) {
            Ok(loaded) => {
                let load_time = started.elapsed();
                self.metrics.record_load(name, version, load_time);
                tracing::info!(
                    model = name,
                    version,
                    load_ms = load_time.as_millis() as u64,
                    single_plan = loaded.has_single_plan(),
                    "model loaded"
                );
                Ok(Arc::new(loaded))
            }
            Err(err) => {
                tracing::warn!(model = name, version, error = %err, "model failed to load");
                self.set_status(name, version, ModelState::Failed, Some(err.to_string()));
                Err(err)
            }
        }
    }

    /// Makes `loaded` the version that answers requests for its model name and
    /// returns the version it replaced.
    pub fn swap(&self, loaded: Arc<LoadedModel>) -> Option<Arc<LoadedModel>> {
        let name = loaded.name.clone();
        let version = loaded.version.clone();
        let previous = self
            .serving
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone(), loaded);
        if let Some(previous) = &previous
            && previous.version != version
        {
            self.statuses
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&(name.clone(), previous.version.clone()));
            self.metrics.model_retired(&name, &previous.version);
        }
        self.set_status(&name, &version, ModelState::Serving, None);
        self.metrics.model_serving(&name, &version);
        tracing::info!(model = name, version, "serving");
        previous
    }

    /// Stops serving `name` (it is no longer assigned) and forgets the states of
    /// all its versions. Requests holding the model finish on it.
    pub fn retire(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let previous = self
            .serving
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(model, _), _| model != name);
        if let Some(previous) = &previous {
            self.metrics.model_retired(name, &previous.version);
            tracing::info!(model = name, version = %previous.version, "retired");
        }
        previous
    }

    /// Records that a version could not be served for a reason found outside
    /// loading (a download or verification failure, an interrupted loader).
    pub fn mark_failed(&self, name: &str, version: &str, error: &str) {
        self.set_status(name, version, ModelState::Failed, Some(error.to_string()));
    }

    /// Names of the models serving now.
    pub fn names(&self) -> Vec<String> {
        self.serving
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// The version serving `name` now.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.serving
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Whether at least one model serves.
    pub fn any_serving(&self) -> bool {
        !self
            .serving
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Records whether the assignment the agent follows names no model (managed
    /// mode sets it from each assignment it applies and from the cached one).
    pub fn set_nothing_assigned(&self, nothing: bool) {
        self.nothing_assigned.store(nothing, Ordering::Relaxed);
    }

    /// Whether the agent is ready to take requests: it serves a model, or it
    /// knows it has none to serve. The second half keeps the pod of a pool that no
    /// rollout has reached yet Ready (else the pool and its DaemonSet would look
    /// broken and `kubectl rollout status` would never finish); an agent that does
    /// not know yet (no assignment from the operator and none cached) or whose
    /// assigned models all failed to load is not ready. A model that serves keeps
    /// the agent ready whatever happens to the operator.
    pub fn ready(&self) -> bool {
        self.any_serving() || self.nothing_assigned.load(Ordering::Relaxed)
    }

    pub fn statuses(&self) -> Vec<VersionStatus> {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// State and cumulative request counters of every version this agent holds,
    /// as managed mode reports them.
    pub fn model_reports(&self) -> Vec<ModelReport> {
        self.metrics.model_reports(&self.statuses())
    }

    fn set_status(&self, name: &str, version: &str, state: ModelState, error: Option<String>) {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                (name.to_string(), version.to_string()),
                VersionStatus {
                    name: name.to_string(),
                    version: version.to_string(),
                    state,
                    error,
                },
            );
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tract_onnx::pb;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::tensor_shape_proto::dimension;

    use super::*;
    use crate::oip::OutputData;
    use crate::validation::{InputTensor, InputValues, ValidRequest};

    /// y = x + bias, x: float[2].
    fn add_model(bias: f32) -> Vec<u8> {
        let info = |name: &str| pb::ValueInfoProto {
            name: name.to_string(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: vec![pb::tensor_shape_proto::Dimension {
                            value: Some(dimension::Value::DimValue(2)),
                            ..Default::default()
                        }],
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(pb::GraphProto {
                name: "add".to_string(),
                node: vec![pb::NodeProto {
                    op_type: "Add".to_string(),
                    input: vec!["x".to_string(), "bias".to_string()],
                    output: vec!["y".to_string()],
                    name: "y".to_string(),
                    ..Default::default()
                }],
                initializer: vec![pb::TensorProto {
                    name: "bias".to_string(),
                    dims: vec![2],
                    data_type: DataType::Float as i32,
                    float_data: vec![bias, bias],
                    ..Default::default()
                }],
                input: vec![info("x")],
                output: vec![info("y")],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn run(model: &LoadedModel) -> OutputData {
        let request = ValidRequest {
            id: None,
            inputs: vec![InputTensor {
                shape: vec![2],
                values: InputValues::Fp32(vec![1.0, 2.0]),
            }],
            outputs: vec![0],
        };
        model.infer(&request).expect("infers").remove(0).data
    }

    fn state_of(registry: &ModelRegistry, version: &str) -> Option<ModelState> {
        registry
            .statuses()
            .into_iter()
            .find(|status| status.version == version)
            .map(|status| status.state)
    }

    #[test]
    fn swap_serves_the_new_version_while_holders_finish_on_the_old() {
        let registry = ModelRegistry::new(Arc::new(Metrics::new()));
        let v1 = registry
            .load_version("add", "1", &add_model(1.0))
            .expect("v1 loads");
        assert!(registry.get("add").is_none(), "loaded is not serving yet");
        assert!(registry.swap(v1).is_none());
        let in_flight = registry.get("add").expect("serving");

        let v2 = registry
            .load_version("add", "2", &add_model(2.0))
            .expect("v2 loads");
        assert_eq!(state_of(&registry, "2"), Some(ModelState::Loading));
        let replaced = registry.swap(v2).expect("replaces v1");
        assert_eq!(replaced.version, "1");

        assert_eq!(run(&in_flight), OutputData::Fp32(vec![2.0, 3.0]));
        let now = registry.get("add").expect("serving");
        assert_eq!(now.version, "2");
        assert_eq!(run(&now), OutputData::Fp32(vec![3.0, 4.0]));
        assert_eq!(state_of(&registry, "2"), Some(ModelState::Serving));
        assert_eq!(state_of(&registry, "1"), None);
        let reports = registry.model_reports();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].version, "2");
    }

    #[test]
    fn retire_and_mark_failed() {
        let registry = ModelRegistry::new(Arc::new(Metrics::new()));
        let v1 = registry
            .load_version("add", "1", &add_model(1.0))
            .expect("v1 loads");
        registry.swap(v1);
        registry.mark_failed("add", "2", "digest mismatch");
        assert_eq!(registry.names(), vec!["add".to_string()]);
        assert_eq!(state_of(&registry, "2"), Some(ModelState::Failed));
        let retired = registry.retire("add").expect("was serving");
        assert_eq!(retired.version, "1");
        assert!(registry.get("add").is_none());
        assert!(registry.names().is_empty());
        assert!(registry.statuses().is_empty());
        assert!(!registry.any_serving());
    }

    #[test]
    fn ready_when_serving_or_when_nothing_is_assigned() {
        let registry = ModelRegistry::new(Arc::new(Metrics::new()));
        assert!(!registry.ready(), "no assignment known yet");
        registry.set_nothing_assigned(true);
        assert!(registry.ready(), "nothing to serve is not a failure");
        registry.set_nothing_assigned(false);
        assert!(!registry.ready(), "assigned but not loaded yet");
        let v1 = registry
            .load_version("add", "1", &add_model(1.0))
            .expect("v1 loads");
        registry.swap(v1);
        assert!(registry.ready());
        registry.retire("add");
        assert!(!registry.ready());
    }

    #[test]
    fn failed_load_keeps_the_old_version_serving() {
        let registry = ModelRegistry::new(Arc::new(Metrics::new()));
        let v1 = registry
            .load_version("add", "1", &add_model(1.0))
            .expect("v1 loads");
        registry.swap(v1);
        let err = registry
            .load_version("add", "2", b"not a model")
            .expect_err("garbage is refused");
        assert_eq!(err.label(), "unloadable");
        assert_eq!(registry.get("add").expect("serving").version, "1");
        let statuses = registry.statuses();
        let failed = statuses
            .iter()
            .find(|status| status.version == "2")
            .expect("v2 status");
        assert_eq!(failed.state, ModelState::Failed);
        assert!(
            failed
                .error
                .as_deref()
                .unwrap_or("")
                .starts_with("not a loadable ONNX model"),
            "{failed:?}"
        );
        assert_eq!(state_of(&registry, "1"), Some(ModelState::Serving));
    }
}
