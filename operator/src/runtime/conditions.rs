//! Condition types and reasons, and the Event reasons of rollouts, in one place:
//! they are part of the API users script against (`kubectl wait`, alerts on
//! reasons), so each is written once here and nowhere else as a literal.

/// The condition type of Models and EdgePools: whether the resource serves.
pub const READY: &str = "Ready";
/// The condition type of ModelRollouts: whether the operator accepted the rollout.
pub const ACCEPTED: &str = "Accepted";

/// Reasons of a Model's Ready condition.
pub mod model {
    pub const FETCHING: &str = "Fetching";
    pub const FETCH_FAILED: &str = "FetchFailed";
    pub const DIGEST_MISMATCH: &str = "DigestMismatch";
    pub const SOURCE_REFUSED: &str = "SourceRefused";
    pub const INVALID_MODEL: &str = "InvalidModel";
    pub const DATASET_UNAVAILABLE: &str = "DatasetUnavailable";
    pub const COMPRESSING: &str = "Compressing";
    pub const VALIDATING: &str = "Validating";
    pub const VALIDATION_FAILED: &str = "ValidationFailed";
    pub const NOTHING_TO_COMPRESS: &str = "NothingToCompress";
    pub const COMPRESSION_FAILED: &str = "CompressionFailed";
    pub const INVALID_VALIDATION_DATASET: &str = "InvalidValidationDataset";
    pub const VERSION_READY: &str = "VersionReady";
    pub const VERSION_CONFLICT: &str = "VersionConflict";
    pub const COMPRESSION_NOT_SUPPORTED: &str = "CompressionNotSupported";
    pub const SOURCE_NOT_SUPPORTED: &str = "SourceNotSupported";
}

/// Reasons of an EdgePool's Ready condition.
pub mod edge_pool {
    pub const NO_NODES: &str = "NoNodes";
    pub const AGENTS_NOT_READY: &str = "AgentsNotReady";
    pub const AGENTS_READY: &str = "AgentsReady";
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
    pub const NOT_ALLOWED: &str = "NotAllowed";
}

/// Reasons of a ModelRollout's Accepted condition and of its Events.
pub mod rollout {
    pub const ACCEPTED: &str = "Accepted";
    pub const CONFLICT: &str = "Conflict";
    pub const ROLLOUT_STARTED: &str = "RolloutStarted";
    pub const STEP_STARTED: &str = "StepStarted";
    pub const PROMOTED: &str = "Promoted";
    pub const DEGRADED: &str = "Degraded";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const ROLLED_BACK: &str = "RolledBack";
    pub const ABORTED: &str = "Aborted";
}
