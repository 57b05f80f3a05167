//! What wraps every reconcile of every controller: the duration metric, the backoff
//! reset on success, and on failure the failure metric, a log line and the delay
//! before the next try.

use crate::runtime::context::Context;
use crate::runtime::object_key;
use kube::ResourceExt;
use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// An error a reconcile can end with: it names its metric label.
pub trait ReconcileError: Display {
    /// The `reason` label of `shoal_reconcile_errors_total`.
    fn metric_label(&self) -> &'static str;
}

/// The error of a reconcile that can fail only in a Kubernetes API call.
#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API call failed: {0}")]
pub struct ApiCallFailed(#[from] pub kube::Error);

impl ReconcileError for ApiCallFailed {
    fn metric_label(&self) -> &'static str {
        "kube"
    }
}

/// Runs one reconcile of `object`, timing it; a success resets the object's backoff.
pub async fn timed<T, E>(
    controller: &'static str,
    ctx: &Context,
    object: &impl ResourceExt,
    reconcile: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = reconcile.await;
    ctx.metrics.reconciled(controller, started.elapsed());
    if result.is_ok() {
        ctx.backoff.reset(&object_key(object));
    }
    result
}

/// After a failed reconcile: counts and logs the error and returns how long to wait
/// before the next try (the object's backoff).
pub fn retry_delay(
    controller: &'static str,
    ctx: &Context,
    object: &impl ResourceExt,
    error: &impl ReconcileError,
) -> Duration {
    ctx.metrics
        .reconcile_failed(controller, error.metric_label());
    let key = object_key(object);
    let delay = ctx.backoff.next_delay(&key);
    tracing::warn!(controller, object = %key, %error, retry_in = ?delay, "reconcile failed");
    delay
}
