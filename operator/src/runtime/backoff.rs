//! Per-object exponential backoff for reconcile errors: each object that keeps
//! failing waits longer (5 s, 10 s, 20 s … up to 5 min); one success resets it.
//! A fixed retry for every error would either hammer a broken source or leave a
//! fixed one waiting for minutes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const FIRST_DELAY: Duration = Duration::from_secs(5);
const MAX_DELAY: Duration = Duration::from_secs(300);

/// Failure counts keyed by object (`namespace/name`).
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records one more failure of `key` and returns how long to wait before retrying.
    pub fn next_delay(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        delay_after(*count)
    }

    /// Forgets the failures of `key` after it reconciled successfully or was deleted.
    pub fn reset(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(key);
    }
}

/// The delay after `failures` consecutive failures (1 = first failure).
pub fn delay_after(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    FIRST_DELAY.saturating_mul(1 << exponent).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_then_cap() {
        assert_eq!(delay_after(1), Duration::from_secs(5));
        assert_eq!(delay_after(2), Duration::from_secs(10));
        assert_eq!(delay_after(4), Duration::from_secs(40));
        assert_eq!(delay_after(7), Duration::from_secs(300));
        assert_eq!(delay_after(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn objects_back_off_independently_and_reset() {
        let backoff = Backoff::default();
        assert_eq!(backoff.next_delay("ns/a"), Duration::from_secs(5));
        assert_eq!(backoff.next_delay("ns/a"), Duration::from_secs(10));
        assert_eq!(backoff.next_delay("ns/b"), Duration::from_secs(5));
        backoff.reset("ns/a");
        assert_eq!(backoff.next_delay("ns/a"), Duration::from_secs(5));
    }
}
