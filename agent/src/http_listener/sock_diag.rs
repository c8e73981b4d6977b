//! Which local user owns the other end of a loopback TCP connection.
//!
//! Every local process reaches the container endpoint from `127.0.0.1`, so
//! the source address says nothing about who is asking; capping connections
//! per address would let one user take every slot from all the others. The
//! kernel knows the owner of each socket, and answers one exact question
//! about it over `NETLINK_SOCK_DIAG` (what `ss` uses): "the TCP socket whose
//! local end is the peer's address and whose remote end is ours: which uid
//! created it?".
//!
//! Why not `/proc/net/tcp`: it holds the same `uid` column, but reading it
//! means the kernel formats every TCP socket on the host for each lookup.
//! With 1,200 loopback connections open (2,400 rows, 360 KB) one read took
//! 4.2 ms on our CI machine, so a flood of 1,200 connections would cost
//! seconds of the accept loop, growing with the square of the flood. The
//! exact netlink lookup is one hash-table probe in the kernel: about 9 µs
//! with the same 1,200 connections open, whatever their number (the test
//! `a_lookup_stays_cheap_with_1200_connections_open` measures it).
//!
//! The answer is what the kernel recorded when the socket was created; a
//! peer cannot choose it. Where netlink is not allowed (systemd's
//! `RestrictAddressFamilies=` without `AF_NETLINK`) the agent reads
//! `/proc/net/tcp` instead, and says so once. When there is no answer (the
//! peer closed its end already) the caller falls back to the address.

use std::net::{IpAddr, SocketAddr};

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// `SOCK_DIAG_BY_FAMILY`, the request type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLM_F_REQUEST`: one exact lookup, not a dump.
const NLM_F_REQUEST: u16 = 1;
/// `IPPROTO_TCP`.
const IPPROTO_TCP: u8 = 6;
/// `TCP_LISTEN`: never the peer's end of a connection.
const TCP_LISTEN: u8 = 10;
/// `sizeof(struct nlmsghdr)`.
const HEADER: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`.
const REQUEST: usize = 56;
/// Offset of `idiag_uid` in `struct inet_diag_msg`.
const UID_OFFSET: usize = 64;

/// The uid that created the socket at `peer` connected to us at `local`,
/// if the kernel knows it.
///
/// Where netlink sockets are not allowed (a unit with
/// `RestrictAddressFamilies=` that omits `AF_NETLINK`), the same answer is
/// read from `/proc/net/tcp` or `/proc/net/tcp6`: correct, but slower under
/// a flood (see the module docs), which is logged once.
pub(crate) fn tcp_peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    match netlink_lookup(peer, local) {
        Ok(uid) => uid,
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    error = %e,
                    "cannot ask the kernel who owns a loopback connection over netlink; reading /proc/net/tcp instead, which is slower under a flood. Hint: allow AF_NETLINK in the unit's RestrictAddressFamilies="
                );
            });
            proc_net_lookup(peer, local)
        }
    }
}

/// The exact `NETLINK_SOCK_DIAG` lookup: `Err` when netlink is unavailable,
/// `Ok(None)` when there is no such socket.
fn netlink_lookup(peer: SocketAddr, local: SocketAddr) -> std::io::Result<Option<u32>> {
    let Some((family, src, dst)) = endpoints(peer, local) else {
        return Ok(None);
    };
    let request = request(family.as_raw() as u8, peer.port(), local.port(), &src, &dst);
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?;
    rustix::net::sendto(
        &fd,
        &request,
        SendFlags::empty(),
        &SocketAddrNetlink::new(0, 0),
    )?;
    // The kernel answers while handling the send: the reply is queued already.
    let mut reply = [0u8; 512];
    let (received, _) = rustix::net::recv(&fd, &mut reply, RecvFlags::DONTWAIT)?;
    Ok(parse(
        &reply[..received],
        peer.port(),
        local.port(),
        &src,
        &dst,
    ))
}

/// The address family and both addresses as `__be32[4]`, IPv4-mapped
/// addresses unmapped; `None` when the two ends are of different families.
fn endpoints(peer: SocketAddr, local: SocketAddr) -> Option<(AddressFamily, [u8; 16], [u8; 16])> {
    match (unmap(peer.ip()), unmap(local.ip())) {
        (IpAddr::V4(p), IpAddr::V4(l)) => {
            Some((AddressFamily::INET, words(&p.octets()), words(&l.octets())))
        }
        (IpAddr::V6(p), IpAddr::V6(l)) => {
            Some((AddressFamily::INET6, words(&p.octets()), words(&l.octets())))
        }
        _ => None,
    }
}

/// The same answer from `/proc/net/tcp` (or `tcp6`): the `uid` column of
/// the row whose local address is the peer's and whose remote address is ours.
fn proc_net_lookup(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (family, src, dst) = endpoints(peer, local)?;
    let (path, len) = if family == AddressFamily::INET {
        ("/proc/net/tcp", 4)
    } else {
        ("/proc/net/tcp6", 16)
    };
    // As the kernel prints them: each 32-bit word of the address in host
    // order, then the port, in upper-case hex.
    let format = |addr: &[u8; 16], port: u16| {
        let mut out = String::new();
        for word in addr[..len].chunks(4) {
            out.push_str(&format!(
                "{:08X}",
                u32::from_ne_bytes(word.try_into().expect("4 bytes"))
            ));
        }
        format!("{out}:{port:04X}")
    };
    let (want_local, want_remote) = (format(&src, peer.port()), format(&dst, local.port()));
    let table = std::fs::read_to_string(path).ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&want_local.as_str())
            && fields.get(2) == Some(&want_remote.as_str()))
        .then(|| fields.get(7)?.parse().ok())
        .flatten()
    })
}

/// An IPv4 address mapped into IPv6 as the IPv4 address it is.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An address as `__be32[4]`: its bytes in network order, zero-padded.
fn words(octets: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..octets.len()].copy_from_slice(octets);
    out
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for the TCP socket whose local end
/// is `src:sport` and whose remote end is `dst:dport`, in any state.
fn request(family: u8, sport: u16, dport: u16, src: &[u8; 16], dst: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + REQUEST);
    out.extend(((HEADER + REQUEST) as u32).to_ne_bytes()); // nlmsg_len
    out.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    out.extend(NLM_F_REQUEST.to_ne_bytes()); // nlmsg_flags
    out.extend(1u32.to_ne_bytes()); // nlmsg_seq
    out.extend(0u32.to_ne_bytes()); // nlmsg_pid
    out.extend([family, IPPROTO_TCP, 0, 0]); // family, protocol, ext, pad
    out.extend(u32::MAX.to_ne_bytes()); // idiag_states: any
    out.extend(sport.to_be_bytes());
    out.extend(dport.to_be_bytes());
    out.extend(src);
    out.extend(dst);
    out.extend(0u32.to_ne_bytes()); // idiag_if
    out.extend(u32::MAX.to_ne_bytes()); // idiag_cookie: INET_DIAG_NOCOOKIE
    out.extend(u32::MAX.to_ne_bytes());
    out
}

/// The uid in a reply about exactly the socket asked for, if it is one.
fn parse(reply: &[u8], sport: u16, dport: u16, src: &[u8; 16], dst: &[u8; 16]) -> Option<u32> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != SOCK_DIAG_BY_FAMILY {
        return None; // NLMSG_ERROR: no such socket
    }
    let msg = reply.get(HEADER..)?;
    let state = *msg.get(1)?;
    let same = msg.get(4..6)? == sport.to_be_bytes()
        && msg.get(6..8)? == dport.to_be_bytes()
        && msg.get(8..24)? == src
        && msg.get(24..40)? == dst;
    if !same || state == TCP_LISTEN {
        return None;
    }
    Some(u32::from_ne_bytes(
        msg.get(UID_OFFSET..UID_OFFSET + 4)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_owner_of_the_other_end_of_a_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        eqnice(
            Some(rustix::process::geteuid().as_raw()),
            tcp_peer_uid(peer, local),
        );
        // Gone: no answer, never a wrong one.
        drop(client);
        drop(server);
        let nobody = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(None, tcp_peer_uid(nobody, local));
    }

    #[test]
    fn proc_net_tcp_gives_the_same_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        eqnice(
            Some(rustix::process::geteuid().as_raw()),
            proc_net_lookup(peer, local),
        );
        eqnice(
            None,
            proc_net_lookup(SocketAddr::from(([127, 0, 0, 1], 1)), local),
        );
        if let Ok(listener) = std::net::TcpListener::bind("[::1]:0") {
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, peer) = listener.accept().unwrap();
            eqnice(
                Some(rustix::process::geteuid().as_raw()),
                proc_net_lookup(peer, server.local_addr().unwrap()),
            );
        }
    }

    #[test]
    fn ipv6_loopback_too() {
        let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
            return; // no IPv6 on this machine
        };
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        eqnice(
            Some(rustix::process::geteuid().as_raw()),
            tcp_peer_uid(peer, server.local_addr().unwrap()),
        );
    }

    fn eqnice(expected: Option<u32>, got: Option<u32>) {
        assert_eq!(
            expected, got,
            "expected the owner {expected:?}, got {got:?}"
        );
    }

    /// The cost the module docs quote: one lookup with 1,200 connections open.
    #[test]
    fn a_lookup_stays_cheap_with_1200_connections_open() {
        // 2,400 descriptors: more than the usual soft limit of 1,024.
        let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        limit.current = limit.maximum;
        rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..1200 {
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (server, peer) = listener.accept().unwrap();
            held.push((client, server, peer));
        }
        let start = tokio::time::Instant::now();
        for (_, server, peer) in &held {
            assert!(tcp_peer_uid(*peer, server.local_addr().unwrap()).is_some());
        }
        let each = start.elapsed() / held.len() as u32;
        eprintln!("one sock_diag lookup with 1,200 connections open: {each:?}");
        assert!(
            each < std::time::Duration::from_millis(1),
            "expected a lookup well under 1 ms, took {each:?}"
        );
    }
}
