//! Model artifacts: the content-addressed store on the operator's volume (`store`),
//! the streaming http fetch of model sources (`fetch`) and the addresses a source
//! may reach (`source_policy`).

pub mod fetch;
pub mod source_policy;
pub mod store;

/// Status carries digests as `sha256:<hex>` (as OCI does); the artifact store keys
/// blobs by the bare hex.
pub fn digest_reference(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// The hex part of a `sha256:<hex>` reference (the reference itself when it has no prefix).
pub fn digest_hex(reference: &str) -> &str {
    reference.strip_prefix("sha256:").unwrap_or(reference)
}
