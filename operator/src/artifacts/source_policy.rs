//! Which addresses a Model's http source may make the operator connect to.
//!
//! A Model author chooses the URL, and the operator fetches it from inside the
//! cluster with its own network position: without a guard, a Model could make it
//! read cloud metadata (169.254.169.254), cluster Services or its own loopback.
//! So, before any connection (and for every address a name resolves to, and every
//! redirect):
//! - link-local addresses (where cloud metadata services live) and internal ones
//!   (loopback, private, shared CGNAT, unique-local IPv6) are refused unless the
//!   operator names their network with `--allow-source-network`;
//! - unspecified, multicast and broadcast addresses are always refused;
//! - public addresses are allowed.
//!
//! Pure: the resolver and the redirect policy in [`super::fetch`] call it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network in CIDR form (`10.0.0.0/8`, `fd00::/8`; a bare address is /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.base, canonical(ip)) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => prefix_matches(
                u128::from(u32::from(base)),
                u128::from(u32::from(ip)),
                32,
                self.prefix,
            ),
            (IpAddr::V6(base), IpAddr::V6(ip)) => {
                prefix_matches(u128::from(base), u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_matches(base: u128, ip: u128, bits: u8, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (base >> shift) == (ip >> shift)
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let base: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a network: expected an address or CIDR such as 10.0.0.0/8 or fd00::/8"))?;
        let bits = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {bits}"))?,
        };
        Ok(Network { base, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// What kind of address an IP is, for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressKind {
    /// Reachable from anywhere: allowed.
    Public,
    /// Inside some network (loopback, private, …): allowed only where the operator
    /// names the network.
    Internal(&'static str),
    /// Never a place to fetch a model from.
    Never(&'static str),
}

/// Pure: the kind of `ip` (an IPv4 address mapped into IPv6 counts as itself).
pub fn kind(ip: IpAddr) -> AddressKind {
    match canonical(ip) {
        IpAddr::V4(ip) => kind_v4(ip),
        IpAddr::V6(ip) => kind_v6(ip),
    }
}

fn kind_v4(ip: Ipv4Addr) -> AddressKind {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        AddressKind::Never("an unspecified (0.0.0.0/8) address")
    } else if ip.is_broadcast() {
        AddressKind::Never("the broadcast address")
    } else if ip.is_multicast() {
        AddressKind::Never("a multicast address")
    } else if ip.is_link_local() {
        AddressKind::Internal("a link-local address (cloud metadata services live there)")
    } else if ip.is_loopback() {
        AddressKind::Internal("a loopback address")
    } else if ip.is_private() {
        AddressKind::Internal("a private address")
    } else if a == 100 && (64..128).contains(&b) {
        // 100.100.100.200 is a cloud metadata service in this range.
        AddressKind::Internal("a shared (carrier-grade NAT) address")
    } else {
        AddressKind::Public
    }
}

fn kind_v6(ip: Ipv6Addr) -> AddressKind {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        AddressKind::Never("the unspecified address")
    } else if ip.is_multicast() {
        AddressKind::Never("a multicast address")
    } else if ip.is_loopback() {
        AddressKind::Internal("a loopback address")
    } else if first & 0xffc0 == 0xfe80 {
        AddressKind::Internal("a link-local address (cloud metadata services live there)")
    } else if first & 0xfe00 == 0xfc00 {
        // Unique-local, fd00:ec2::254 (the IPv6 metadata service) included.
        AddressKind::Internal("a unique-local address")
    } else if first & 0xffc0 == 0xfec0 {
        AddressKind::Internal("a site-local address")
    } else {
        AddressKind::Public
    }
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) addresses reach the
/// IPv4 address they carry: judge that one.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let segments = v6.segments();
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [.., hi, lo] = segments;
                return IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
            }
            ip
        }
        v4 => v4,
    }
}

/// The networks the operator allows beyond public addresses.
#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    allowed: Vec<Network>,
}

impl SourcePolicy {
    pub fn new(allowed: Vec<Network>) -> Self {
        SourcePolicy { allowed }
    }

    /// None when the operator may connect to `ip`; otherwise why not, and what to do.
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        match kind(ip) {
            AddressKind::Public => None,
            AddressKind::Never(what) => Some(format!(
                "{ip} is {what}; a Model source must be a reachable server"
            )),
            AddressKind::Internal(what) => {
                if self.allowed.iter().any(|network| network.contains(ip)) {
                    None
                } else {
                    Some(format!(
                        "{ip} is {what}; the operator does not fetch Model sources from it unless \
                         its network is allowed (shoal-operator --allow-source-network, chart \
                         value modelSources.allowNetworks)"
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn net(text: &str) -> Network {
        text.parse().expect("network")
    }

    #[test]
    fn kinds_of_addresses() {
        let cases = [
            ("8.8.8.8", "public"),
            ("2606:4700::1111", "public"),
            ("169.254.169.254", "internal"),
            ("100.100.100.200", "internal"),
            ("fd00:ec2::254", "internal"),
            ("fe80::1", "internal"),
            ("127.0.0.1", "internal"),
            ("127.0.0.2", "internal"),
            ("::1", "internal"),
            ("10.96.0.1", "internal"),
            ("172.16.0.1", "internal"),
            ("172.32.0.1", "public"),
            ("192.168.1.1", "internal"),
            ("100.64.0.1", "internal"),
            ("::ffff:169.254.169.254", "internal"),
            ("::ffff:8.8.8.8", "public"),
            ("64:ff9b::a9fe:a9fe", "internal"),
            ("0.0.0.0", "never"),
            ("0.1.2.3", "never"),
            ("::", "never"),
            ("255.255.255.255", "never"),
            ("224.0.0.1", "never"),
            ("ff02::1", "never"),
        ];
        for (address, expected) in cases {
            let got = match kind(ip(address)) {
                AddressKind::Public => "public",
                AddressKind::Internal(_) => "internal",
                AddressKind::Never(_) => "never",
            };
            assert_eq!(got, expected, "{address}");
        }
    }

    #[test]
    fn networks_parse_and_contain() {
        assert!(net("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("127.0.0.2").contains(ip("127.0.0.2")));
        assert!(!net("127.0.0.2").contains(ip("127.0.0.1")));
        assert!(net("0.0.0.0/0").contains(ip("169.254.169.254")));
        assert!(!net("0.0.0.0/0").contains(ip("::1")));
        assert!(net("fd00::/8").contains(ip("fd12::1")));
        assert!(net("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        assert_eq!(net("10.1.0.0/16").to_string(), "10.1.0.0/16");
        for bad in ["10.0.0.0/33", "fd00::/129", "example.com", "10.0.0.0/x", ""] {
            let error = bad.parse::<Network>().expect_err(bad);
            assert!(error.contains(bad) || bad.is_empty(), "{error}");
        }
    }

    #[test]
    fn the_policy_refuses_internal_addresses_unless_their_network_is_allowed() {
        let default = SourcePolicy::default();
        assert_eq!(default.refusal(ip("93.184.216.34")), None);
        let metadata = default.refusal(ip("169.254.169.254")).expect("refused");
        assert!(metadata.contains("metadata"), "{metadata}");
        assert!(metadata.contains("--allow-source-network"), "{metadata}");
        assert!(default.refusal(ip("127.0.0.1")).is_some());

        let allowing = SourcePolicy::new(vec![net("127.0.0.2/32"), net("10.0.0.0/8")]);
        assert_eq!(allowing.refusal(ip("127.0.0.2")), None);
        assert_eq!(allowing.refusal(ip("10.1.2.3")), None);
        assert!(allowing.refusal(ip("127.0.0.1")).is_some());
        assert!(allowing.refusal(ip("169.254.169.254")).is_some());
        // Never-addresses stay refused even inside an allowed network.
        let everything = SourcePolicy::new(vec![net("0.0.0.0/0")]);
        assert!(everything.refusal(ip("0.0.0.0")).is_some());
        assert_eq!(everything.refusal(ip("169.254.169.254")), None);
    }
}
