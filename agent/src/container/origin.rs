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
//!   to its address straight out of a bridge device (no gateway) that is not
//!   the host's uplink (no default route through it: a host whose `eth0` is
//!   enslaved to a bridge has the network behind it). It has no local uid,
//!   so its address keys the cap.
//!
//! Anything else is refused at accept. The lock-down rule
//! (`agent/host/imds-lockdown.nft`) restricts the port to loopback and local
//! bridges as well, so either guard alone keeps the network out.
//!
//! The routes come from `/proc/self/net/route` and `/proc/self/net/ipv6_route`
//! (the agent's own network namespace), bridges from `/sys/class/net/NAME/bridge`.
//! The question asked of them is where the kernel sends replies: the most
//! specific route, and of those the lowest metric, as the kernel picks. A
//! peer that spoofs a bridge's address from elsewhere never sees the
//! handshake's reply, so it never gets an accepted connection to classify.
//! An IPv6 link-local peer (`fe80::/10`) has a route on every link: the
//! link it came in on (the address's scope id) decides instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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

/// One route: destination, prefix length, metric, direct (no gateway), device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    dest: IpAddr,
    prefix: u8,
    metric: u32,
    direct: bool,
    device: String,
}

/// `RTF_GATEWAY` in the routes' flags.
const RTF_GATEWAY: u32 = 0x2;
/// `RTF_REJECT`: an unreachable route.
const RTF_REJECT: u32 = 0x200;

/// Where `remote` is: `local_uid` says who owns the local socket at
/// `remote`, if any (the kernel's answer, `sock_diag`); otherwise the
/// routing table and `/sys/class/net` decide. An IPv4-mapped IPv6 address
/// is taken as the IPv4 address it maps.
pub(crate) fn classify(remote: SocketAddr, local_uid: impl FnOnce() -> Option<u32>) -> Origin {
    classify_with(remote, local_uid, routes, device_name, is_bridge)
}

/// [`classify`], with the routing table to `remote`'s family, the names of
/// interfaces by index and which devices are bridges given.
fn classify_with(
    remote: SocketAddr,
    local_uid: impl FnOnce() -> Option<u32>,
    routes: impl FnOnce(IpAddr) -> Vec<Route>,
    name_of: impl Fn(u32) -> Option<String>,
    bridge: impl Fn(&str) -> bool,
) -> Origin {
    let scope = match remote {
        SocketAddr::V6(v6) => v6.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    let remote = remote.ip().to_canonical();
    if remote.is_loopback() {
        return Origin::Host(local_uid());
    }
    if let Some(uid) = local_uid() {
        return Origin::Host(Some(uid));
    }
    if is_link_local_v6(remote) {
        return classify_link_local(scope, name_of, bridge);
    }
    classify_by_routes(remote, &routes(remote), bridge)
}

/// The main routing table of `remote`'s family, as the agent's network
/// namespace has it now; empty when it cannot be read (every peer is then
/// refused).
fn routes(remote: IpAddr) -> Vec<Route> {
    match remote {
        IpAddr::V4(_) => std::fs::read_to_string("/proc/self/net/route")
            .map(|t| parse_ipv4_routes(&t))
            .unwrap_or_default(),
        IpAddr::V6(_) => std::fs::read_to_string("/proc/self/net/ipv6_route")
            .map(|t| parse_ipv6_routes(&t))
            .unwrap_or_default(),
    }
}

/// Is `ip` an IPv6 link-local address (`fe80::/10`)?
fn is_link_local_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// A link-local peer: behind a bridge when the link it came in on (its
/// scope id, an interface index) is one; else, or with no scope, elsewhere.
fn classify_link_local(
    scope: u32,
    name_of: impl Fn(u32) -> Option<String>,
    bridge: impl Fn(&str) -> bool,
) -> Origin {
    match (scope != 0).then(|| name_of(scope)).flatten() {
        Some(device) if bridge(&device) => Origin::Bridge(device),
        _ => Origin::Elsewhere,
    }
}

/// The name of the interface with index `index`: the entry of
/// `/sys/class/net` whose `ifindex` it is.
fn device_name(index: u32) -> Option<String> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| {
            std::fs::read_to_string(entry.path().join("ifindex"))
                .is_ok_and(|i| i.trim().parse() == Ok(index))
        })
        .and_then(|entry| entry.file_name().into_string().ok())
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

/// The route the kernel takes to `remote` in `table` (the most specific,
/// then the lowest metric): a bridge's if direct through a device `bridge`
/// says is one and that does not hold a default route, else
/// [`Origin::Elsewhere`].
fn classify_by_routes(remote: IpAddr, table: &[Route], bridge: impl Fn(&str) -> bool) -> Origin {
    let best = table
        .iter()
        .filter(|r| contains(r.dest, r.prefix, remote))
        .min_by_key(|r| (std::cmp::Reverse(r.prefix), r.metric));
    // A bridge holding the default route is the host's uplink (libvirt,
    // LXD or OpenStack hosts bridge eth0): behind it is the network.
    let uplink = |device: &str| table.iter().any(|r| r.prefix == 0 && r.device == device);
    match best {
        Some(route) if route.direct && bridge(&route.device) && !uplink(&route.device) => {
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
            let metric = f[6].parse().ok()?;
            let mask = u32::from(Ipv4Addr::from(word(f[7])?));
            if flags & RTF_REJECT != 0 || mask.leading_ones() != mask.count_ones() {
                return None;
            }
            Some(Route {
                dest: dest.into(),
                prefix: u8::try_from(mask.count_ones()).ok()?,
                metric,
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
                metric: u32::from_str_radix(f[5], 16).ok()?,
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

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_local_socket_is_the_host_whatever_its_address() {
        assert_eq!(
            classify(addr("203.0.113.9:1"), || Some(1000)),
            Origin::Host(Some(1000))
        );
        assert_eq!(classify(addr("127.0.0.1:1"), || None), Origin::Host(None));
        assert_eq!(classify(addr("[::1]:1"), || Some(7)), Origin::Host(Some(7)));
    }

    /// Two routes to one prefix: the kernel replies through the one of
    /// lowest metric, whatever order `/proc/net/route` lists them in.
    #[cfg(target_endian = "little")]
    #[test]
    fn of_two_routes_to_a_prefix_the_lowest_metric_decides() {
        // 172.17.0.0/16 on eth0 (metric 0, where replies go) and on docker0
        // (metric 100, unused): a host on eth0's side is not a container.
        let eth0_first = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t100\t0000FFFF\t0\t0\t0
";
        let table = parse_ipv4_routes(eth0_first);
        assert_eq!(
            classify_by_routes(ip("172.17.0.2"), &table, bridges),
            Origin::Elsewhere,
            "replies to 172.17.0.2 leave by eth0 (metric 0), not docker0 (metric 100): {table:?}"
        );
        let docker0_preferred = eth0_first.replace("\t0\t0\t0\t0000FFFF", "\t0\t0\t200\t0000FFFF");
        let table = parse_ipv4_routes(&docker0_preferred);
        assert_eq!(
            classify_by_routes(ip("172.17.0.2"), &table, bridges),
            Origin::Bridge("docker0".into()),
            "replies to 172.17.0.2 leave by docker0 (metric 100, eth0's is 200): {table:?}"
        );
    }

    /// A host whose uplink is a bridge (eth0 enslaved to br0, as libvirt,
    /// LXD or OpenStack hosts do): br0 holds the default route and the
    /// subnet, and what is behind it is the network, not a container.
    #[cfg(target_endian = "little")]
    #[test]
    fn a_bridge_holding_the_default_route_is_the_uplink_not_a_container() {
        let bridged_uplink = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
br0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
br0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";
        let table = parse_ipv4_routes(bridged_uplink);
        let bridge = |device: &str| device == "br0" || device == "docker0";
        assert_eq!(
            classify_by_routes(ip("192.168.1.50"), &table, bridge),
            Origin::Elsewhere,
            "a neighbour on the bridged uplink (192.168.1.0/24, default via br0): {table:?}"
        );
        assert_eq!(
            classify_by_routes(ip("172.17.0.2"), &table, bridge),
            Origin::Bridge("docker0".into())
        );
        let ipv6 = parse_ipv6_routes(
            "00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
             fe800000000000000000000000000001 00000400 00000001 00000000 00000003      br0\n\
             20010db8000000000000000000000000 40 00000000000000000000000000000000 00 \
             00000000000000000000000000000000 00000100 00000001 00000000 00000001      br0\n",
        );
        assert_eq!(
            classify_by_routes(ip("2001:db8::50"), &ipv6, bridge),
            Origin::Elsewhere,
            "a neighbour on the bridged uplink (2001:db8::/64, default via br0): {ipv6:?}"
        );
    }

    /// fe80::/64 is routed on every link: the link a link-local peer came
    /// in on (its scope id) is where it is.
    #[test]
    fn a_link_local_peer_is_where_its_scope_says() {
        let table = parse_ipv6_routes(&format!(
            "{IPV6}fe800000000000000000000000000000 40 00000000000000000000000000000000 00 \
             00000000000000000000000000000000 00000100 00000001 00000000 00000001  docker0\n"
        ));
        let name_of = |index: u32| match index {
            2 => Some("eth0".to_owned()),
            3 => Some("docker0".to_owned()),
            _ => None,
        };
        for (peer, want) in [
            // A neighbour on eth0: docker0's fe80::/64 comes last in the table.
            ("[fe80::1%2]:40000", Origin::Elsewhere),
            ("[fe80::1%3]:40000", Origin::Bridge("docker0".into())),
            // No scope, or a link that is gone: refused.
            ("[fe80::1]:40000", Origin::Elsewhere),
            ("[fe80::1%9]:40000", Origin::Elsewhere),
        ] {
            assert_eq!(
                classify_with(addr(peer), || None, |_| table.clone(), name_of, bridges),
                want,
                "peer {peer}"
            );
        }
    }

    /// An IPv4-mapped peer (a dual-stack socket) is its IPv4 address.
    #[cfg(target_endian = "little")]
    #[test]
    fn an_ipv4_mapped_peer_is_its_ipv4_address() {
        let v4 = parse_ipv4_routes(IPV4);
        let routes = |remote: IpAddr| match remote {
            IpAddr::V4(_) => v4.clone(),
            IpAddr::V6(_) => Vec::new(),
        };
        let none = |_| None;
        assert_eq!(
            classify_with(addr("[::ffff:127.0.0.1]:1"), || None, routes, none, bridges),
            Origin::Host(None)
        );
        assert_eq!(
            classify_with(
                addr("[::ffff:172.17.0.2]:1"),
                || None,
                routes,
                none,
                bridges
            ),
            Origin::Bridge("docker0".into())
        );
        assert_eq!(
            classify_with(
                addr("[::ffff:172.31.5.6]:1"),
                || None,
                routes,
                none,
                bridges
            ),
            Origin::Elsewhere
        );
    }
}
