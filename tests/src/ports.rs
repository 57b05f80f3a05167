//! Free TCP ports for the processes the tests start.

use anyhow::{Context as _, bail};
use std::hash::{BuildHasher, Hasher};

/// A TCP port on 127.0.0.1 that is free right now.
pub fn free_port() -> anyhow::Result<u16> {
    // Not a port from bind(":0"): that comes from the kernel's ephemeral range, and any
    // outgoing connection on the machine (the operator's own calls to the API server)
    // can take it between the moment we pick it and the moment the process binds it.
    // Ports below that range (and below NodePorts, 30000-32767) are only ever taken by
    // an explicit bind, so a port that binds now stays ours, also across a restart.
    // The start is random per process so that concurrent test binaries rarely meet.
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    const LOWEST: u16 = 20_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading /proc/sys/net/ipv4/ip_local_port_range")?;
    let ephemeral_low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|low| low.parse().ok())
        .context("cannot parse /proc/sys/net/ipv4/ip_local_port_range")?;
    let highest = ephemeral_low.min(30_000);
    if highest <= LOWEST {
        bail!(
            "the ephemeral port range starts at {ephemeral_low}: no ports left for tests below it"
        );
    }
    let span = u32::from(highest - LOWEST);
    let next = NEXT.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        std::sync::atomic::AtomicU32::new(hasher.finish() as u32 % span)
    });
    for _ in 0..span {
        let offset = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % span;
        let port = LOWEST + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port on 127.0.0.1 between {LOWEST} and {highest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ephemeral_range() -> anyhow::Result<(u16, u16)> {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
        let bounds: Vec<u16> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        match bounds[..] {
            [low, high] => Ok((low, high)),
            _ => bail!("cannot parse ip_local_port_range: {text:?}"),
        }
    }

    // A port in the kernel's ephemeral range can be taken by any outgoing connection
    // (the operator's own calls to the API server) between the moment the harness picks
    // it and the moment a process binds it: "Address already in use" in CI.
    #[test]
    fn free_ports_lie_outside_the_ephemeral_range_and_are_never_handed_out_twice()
    -> anyhow::Result<()> {
        let (low, high) = ephemeral_range()?;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let port = free_port()?;
            assert!(
                !(low..=high).contains(&port),
                "port {port} is inside the ephemeral range {low}-{high}"
            );
            assert!(seen.insert(port), "port {port} was handed out twice");
            std::net::TcpListener::bind(("127.0.0.1", port))?;
        }
        Ok(())
    }
}
