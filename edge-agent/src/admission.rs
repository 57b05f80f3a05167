//! Bounded work for inference: a fixed number of workers and a bounded queue in
//! front of them. A request that finds the queue full is turned away at once, so
//! overload costs a fast 429 instead of memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

pub struct Admission {
    /// One permit per request admitted (queued or running): workers + queue.
    /// Held from before the body is read until the work is done, so bodies in
    /// memory are bounded too.
    slots: Arc<Semaphore>,
    /// One permit per request running inference.
    workers: Arc<Semaphore>,
    /// Admitted requests that do not hold a worker yet.
    waiting: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// The right to be queued: taken before the body is read.
pub struct Slot(OwnedSemaphorePermit);

/// The right to run: a slot and a worker, dropped when the work is done (also
/// when the client is gone and the blocking work still finishes).
pub struct Running {
    _slot: OwnedSemaphorePermit,
    _worker: OwnedSemaphorePermit,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the agent is shutting down")]
pub struct Closed;

impl Admission {
    pub fn new(workers: usize, queue: usize, metrics: Arc<Metrics>) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(workers + queue)),
            workers: Arc::new(Semaphore::new(workers)),
            waiting: AtomicUsize::new(0),
            metrics,
        }
    }

    /// A slot if one is free now; `None` means the queue is full.
    pub fn try_admit(&self) -> Option<Slot> {
        self.slots.clone().try_acquire_owned().ok().map(Slot)
    }

    /// Waits in line for a worker. Cancel-safe: dropping the future leaves the line.
    pub async fn run(&self, slot: Slot) -> Result<Running, Closed> {
        let waiting = Waiting::enter(self);
        let worker = self
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Closed)?;
        drop(waiting);
        Ok(Running {
            _slot: slot.0,
            _worker: worker,
        })
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Counts a request in the queue depth for as long as it waits, however the
/// wait ends.
struct Waiting<'a> {
    admission: &'a Admission,
}

impl<'a> Waiting<'a> {
    fn enter(admission: &'a Admission) -> Waiting<'a> {
        let depth = admission.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        admission.metrics.set_queue_depth(depth);
        Waiting { admission }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let depth = self.admission.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        self.admission.metrics.set_queue_depth(depth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_workers_plus_queue_then_refuses() {
        let admission = Admission::new(1, 1, Arc::new(Metrics::new()));
        let first = admission.try_admit().expect("worker slot");
        let second = admission.try_admit().expect("queue slot");
        assert!(admission.try_admit().is_none(), "queue is full");
        let running = admission.run(first).await.expect("runs");
        // The second waits for the worker the first holds.
        let waiting = admission.run(second);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), &mut waiting)
                .await
                .is_err()
        );
        assert_eq!(admission.queue_depth(), 1);
        drop(running);
        let _second = waiting.await.expect("runs after the first");
        assert_eq!(admission.queue_depth(), 0);
        assert!(
            admission.try_admit().is_some(),
            "the first's slot is free again"
        );
    }
}
