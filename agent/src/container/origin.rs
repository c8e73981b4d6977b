//! Where a request to the container link's address (169.254.170.23 or
//! fd00:ec2::23) comes from, and whether it may be served.
//!
//! On loopback only local processes reach the endpoint. The container link's
//! address is an ordinary host address, so anything that can route a packet
//! to it could ask: a container on a local bridge (the point of the link),
//! but also a neighbour on the instance's own subnet that adds a route. Only
//! two kinds of peer are served:
//!
//! - a process on this host: the kernel knows the socket at the other end
//!   (`sock_diag`), and its owner's uid keys the per-peer cap, as on loopback;
//! - a container behind a local bridge: the main routing table sends replies
//!   to its address straight out of a bridge device (no gateway). It has no
//!   local uid, so its address keys the cap.
//!
//! Anything else is refused at accept. The lock-down rule
//! (`agent/host/imds-lockdown.nft`) restricts the port to loopback and local
//! bridges as well, so either guard alone keeps the network out.
//!
//! The routes come from `/proc/self/net/route` and `/proc/self/net/ipv6_route`
//! (the agent's own network namespace), bridges from `/sys/class/net/NAME/bridge`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where a peer is, as far as this host can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A process on this host (loopback, or a socket the kernel knows),
    /// owned by this uid when the kernel says.
    Host(Option<u32>),
    /// A container behind this local bridge device.
    Bridge(String),
    /// Anywhere else: refused.
    Elsewhere,
}

/// One route: destination, prefix length, direct (no gateway), device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    dest: IpAddr,
    prefix: u8,
    direct: bool,
    device: String,
}

/// `RTF_GATEWAY` in the routes' flags.
const RTF_GATEWAY: u32 = 0x2;
/// `RTF_REJECT`: an unreachable route.
const RTF_REJECT: u32 = 0x200;

/// Where `remote` is: `local_uid` says who owns the local socket at
/// `remote`, if any (the kernel's answer, `sock_diag`); otherwise the
/// routing table and `/sys/class/net` decide.
pub(crate) fn classify(remote: IpAddr, local_uid: impl FnOnce() -> Option<u32>) -> Origin {
    if remote.is_loopback() {
        return Origin::Host(local_uid());
    }
    if let Some(uid) = local_uid() {
        return Origin::Host(Some(uid));
    }
    let table = match remote {
        IpAddr::V4(_) => std::fs::read_to_string("/proc/self/net/route")
            .map(|t| parse_ipv4_routes(&t))
            .unwrap_or_default(),
        IpAddr::V6(_) => std::fs::read_to_string("/proc/self/net/ipv6_route")
            .map(|t| parse_ipv6_routes(&t))
            .unwrap_or_default(),
    };
    classify_by_routes(remote, &table, is_bridge)
}

/// Is `device` a bridge (it has `/sys/class/net/DEVICE/bridge`)?
fn is_bridge(device: &str) -> bool {
    !device.contains('/')
        && !device.starts_with('.')
        && std::path::Path::new("/sys/class/net")
            .join(device)
            .join("bridge")
            .is_dir()
}

/// The most specific route to `remote` in `table`: a bridge's if direct
/// through a device `bridge` says is one, else [`Origin::Elsewhere`].
fn classify_by_routes(remote: IpAddr, table: &[Route], bridge: impl Fn(&str) -> bool) -> Origin {
    let best = table
        .iter()
        .filter(|r| contains(r.dest, r.prefix, remote))
        .max_by_key(|r| r.prefix);
    match best {
        Some(route) if route.direct && bridge(&route.device) => {
            Origin::Bridge(route.device.clone())
        }
        _ => Origin::Elsewhere,
    }
}

/// Is `ip` inside `net/prefix`?
fn contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) if prefix <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) if prefix <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric
/// Mask ...`, addresses as the kernel's in-memory (network order) words
/// printed as native integers.
fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let dest = Ipv4Addr::from(word(f[1])?);
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            let mask = u32::from(Ipv4Addr::from(word(f[7])?));
            if flags & RTF_REJECT != 0 || mask.leading_ones() != mask.count_ones() {
                return None;
            }
            Some(Route {
                dest: dest.into(),
                prefix: u8::try_from(mask.count_ones()).ok()?,
                direct: flags & RTF_GATEWAY == 0,
                device: f[0].to_owned(),
            })
        })
        .collect()
}

/// `/proc/net/ipv6_route`: `DEST PREFIXLEN SRC SRCLEN NEXTHOP METRIC
/// REFCNT USE FLAGS DEVICE`, addresses as 32 hex digits in network order.
fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    let address = |hex: &str| u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from);
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[0].len() != 32 || f[4].len() != 32 {
                return None;
            }
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            if flags & RTF_REJECT != 0 {
                return None;
            }
            Some(Route {
                dest: address(f[0])?.into(),
                prefix: u8::from_str_radix(f[1], 16).ok()?,
                direct: flags & RTF_GATEWAY == 0 && address(f[4])?.is_unspecified(),
                device: f[9].to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip route` on a Docker host: default via eth0's gateway, the VPC
    /// subnet on eth0, docker0's subnet, and a route through a gateway into
    /// another bridge's range, captured from `/proc/net/route` (x86_64).
    const IPV4: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t01001FAC\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t00001FAC\t00000000\t0001\t0\t0\t100\t0000FFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth0\t008011AC\t01001FAC\t0003\t0\t0\t0\t0080FFFF\t0\t0\t0
";

    const IPV6: &str = "\
fd000001000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001  docker0
fd000002000000000000000000000000 40 00000000000000000000000000000000 00 fd000001000000000000000000000009 00000400 00000001 00000000 00000003  docker0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
";

    fn bridges(device: &str) -> bool {
        device == "docker0"
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn a_container_on_a_bridge_is_served_and_the_subnet_is_not() {
        let table = parse_ipv4_routes(IPV4);
        assert_eq!(table.len(), 4, "{table:?}");
        for (peer, want) in [
            ("172.17.0.2", Origin::Bridge("docker0".into())),
            // A neighbour on the instance's subnet (eth0, no bridge).
            ("172.31.5.6", Origin::Elsewhere),
            // The internet, through the default gateway.
            ("203.0.113.9", Origin::Elsewhere),
            // Inside docker0's /16, but a more specific route sends it to a gateway.
            ("172.17.200.1", Origin::Elsewhere),
        ] {
            assert_eq!(
                classify_by_routes(ip(peer), &table, bridges),
                want,
                "peer {peer}"
            );
        }
    }

    #[test]
    fn ipv6_too() {
        let table = parse_ipv6_routes(IPV6);
        assert_eq!(table.len(), 3, "the reject route is dropped: {table:?}");
        for (peer, want) in [
            ("fd00:1::2", Origin::Bridge("docker0".into())),
            // Routed through a gateway that sits on the bridge.
            ("fd00:2::2", Origin::Elsewhere),
            ("fe80::1", Origin::Elsewhere),
            ("2001:db8::1", Origin::Elsewhere),
        ] {
            assert_eq!(
                classify_by_routes(ip(peer), &table, bridges),
                want,
                "peer {peer}"
            );
        }
    }

    #[test]
    fn a_local_socket_is_the_host_whatever_its_address() {
        assert_eq!(
            classify(ip("203.0.113.9"), || Some(1000)),
            Origin::Host(Some(1000))
        );
        assert_eq!(classify(ip("127.0.0.1"), || None), Origin::Host(None));
        assert_eq!(classify(ip("::1"), || Some(7)), Origin::Host(Some(7)));
    }
}
