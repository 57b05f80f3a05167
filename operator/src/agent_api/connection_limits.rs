//! How many connections the agent API holds at once, in all and per source
//! address, so that no client (or crowd of clients) can take every file descriptor
//! or every byte of memory the operator has. A connection over either cap is closed
//! as soon as it is accepted, before a byte is read from it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The default of `--agent-api-max-connections`: every agent of a large fleet
/// holds about two (a long-poll and a report), with room to spare.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32_768;
/// The default of `--agent-api-max-connections-per-source`. Agents on the hub's
/// own nodes each come from an address of their own; agents that come through a
/// NAT or a load balancer that hides their addresses share one, so raise it (or
/// set 0, no cap) for those.
pub const DEFAULT_MAX_PER_SOURCE: usize = 256;

/// The caps, and the connections open now.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    /// 0: no cap per source address.
    max_per_source: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total(usize),
    PerSource(usize),
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: max_total.max(1),
            max_per_source,
            open: Mutex::new(Open::default()),
        })
    }

    /// Counts a connection from `source`, or refuses it when a cap is reached. The
    /// connection counts until the returned guard is dropped.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<ConnectionGuard, Refused> {
        let mut open = crate::runtime::lock(&self.open);
        if open.total >= self.max_total {
            return Err(Refused::Total(self.max_total));
        }
        let from_source = open.per_source.get(&source).copied().unwrap_or(0);
        if self.max_per_source > 0 && from_source >= self.max_per_source {
            return Err(Refused::PerSource(self.max_per_source));
        }
        open.total += 1;
        open.per_source.insert(source, from_source + 1);
        Ok(ConnectionGuard {
            limits: self.clone(),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        crate::runtime::lock(&self.open).total
    }

    fn release(&self, source: IpAddr) {
        let mut open = crate::runtime::lock(&self.open);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_source.get_mut(&source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.per_source.remove(&source);
            }
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    source: IpAddr,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.limits.release(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn caps_per_source_and_in_all_and_frees_places_on_drop() {
        let limits = ConnectionLimits::new(3, 2);
        let a1 = limits.admit(ip(1)).expect("first from a");
        let a2 = limits.admit(ip(1)).expect("second from a");
        assert_eq!(limits.admit(ip(1)).err(), Some(Refused::PerSource(2)));
        let b1 = limits.admit(ip(2)).expect("first from b");
        assert_eq!(limits.admit(ip(3)).err(), Some(Refused::Total(3)));
        assert_eq!(limits.open(), 3);
        drop(a1);
        let a3 = limits.admit(ip(1)).expect("a place of a is free again");
        drop((a2, a3, b1));
        assert_eq!(limits.open(), 0);
        assert!(crate::runtime::lock(&limits.open).per_source.is_empty());
    }

    #[test]
    fn zero_per_source_means_no_cap_per_source() {
        let limits = ConnectionLimits::new(100, 0);
        let guards: Vec<_> = (0..50)
            .map(|_| limits.admit(ip(1)).expect("admitted"))
            .collect();
        assert_eq!(limits.open(), 50);
        drop(guards);
        assert_eq!(limits.open(), 0);
    }
}
