//! The supplementary groups of a Unix-socket peer, as the kernel captured
//! them when the peer connected (`SO_PEERGROUPS`, Linux 4.13 and later).
//!
//! # Why this way
//!
//! `SO_PEERCRED` carries the peer's uid, primary gid and pid, not its
//! supplementary groups. `SO_PEERGROUPS` returns those groups from the same
//! credentials, fixed at `connect` (for a socket pair, at creation): the
//! peer cannot change what the agent sees by changing its groups afterwards,
//! nor by passing the connection to another process. Reading
//! `/proc/PID/status` instead would trust a pid that may by then belong to
//! another process (the peer connects, hands the socket on and exits; its
//! pid is reused by a process with other groups), and the unit's
//! `ProtectProc=invisible` hides it anyway. So the agent never falls back
//! to `/proc`: on a kernel without `SO_PEERGROUPS` ([`read_or_none`]) a
//! peer is matched by its uid and primary gid only, and never given the
//! instance role in place of a consumer its groups might have matched.
//!
//! rustix has no wrapper for this option, so this module is the agent's one
//! `unsafe` call: `getsockopt` into a buffer of `gid_t`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Most groups read for one peer (`NGROUPS_MAX` on Linux is 65536): a
/// bound on the buffer, whatever the kernel says it needs.
pub const MAX_GROUPS: usize = 65_536;

/// First buffer size, in groups; grown to what the kernel asks for (ERANGE).
const FIRST_GUESS: usize = 64;

/// The supplementary groups of the peer of the connected Unix socket
/// `socket`, as the kernel captured them at connect time (in the kernel's
/// order, which is sorted). The primary gid is not necessarily among them.
///
/// Errors: `ENOPROTOOPT` on kernels before 4.13, `ENODATA` for a socket
/// without a peer; `E2BIG` if the peer has more than [`MAX_GROUPS`]
/// groups (which Linux does not allow).
pub fn read(socket: impl AsFd) -> io::Result<Vec<u32>> {
    let mut groups = Vec::new();
    let n = read_into(socket, &mut groups)?;
    groups.truncate(n);
    Ok(groups)
}

/// As [`read`], into `buffer`, reusing its allocation: returns how many
/// groups it holds now (`buffer[..n]`; what follows is left over). A
/// listener reads every peer's groups into one buffer, so a peer with
/// 65,536 groups costs one 256 KiB buffer for the listener's lifetime, not
/// an allocation per connection.
pub fn read_into(socket: impl AsFd, buffer: &mut Vec<u32>) -> io::Result<usize> {
    let fd = socket.as_fd().as_raw_fd();
    if buffer.len() < FIRST_GUESS {
        buffer.resize(FIRST_GUESS, 0);
    }
    loop {
        let capacity = buffer.len();
        let mut len = libc::socklen_t::try_from(capacity * size_of::<libc::gid_t>())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        #[allow(
            unsafe_code,
            reason = "rustix has no SO_PEERGROUPS: one getsockopt into a buffer we own"
        )]
        // SAFETY: `fd` is a descriptor borrowed from `socket` for the whole
        // call; `buffer` is a live, initialised buffer of `capacity` u32
        // (gid_t is u32 on Linux), i.e. exactly `len` bytes, and the kernel
        // writes at most `len` bytes there (when the groups do not fit it
        // writes none, sets `len` to the size needed and fails with ERANGE).
        // `len` is a valid, exclusively borrowed socklen_t the kernel updates.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buffer.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            return Ok(needed.min(capacity));
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) {
            return Err(error);
        }
        // The kernel said how many it has: grow to that (bounded) and ask again.
        if needed > MAX_GROUPS {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        let grown = needed.max(capacity * 2).min(MAX_GROUPS);
        if grown <= capacity {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        buffer.resize(grown, 0);
    }
}

/// As [`read_into`], but a failure (an old kernel without `SO_PEERGROUPS`,
/// or anything else) gives `None`: the peer's groups are unknown, and it
/// is matched fail-closed ([`crate::broker::config::Match::GroupsUnknown`]).
/// The first failure is logged at debug level, once per process; `/proc`
/// is never consulted instead (module docs).
pub fn read_or_none(socket: impl AsFd, buffer: &mut Vec<u32>) -> Option<&[u32]> {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    match read_into(socket, buffer) {
        Ok(n) => Some(&buffer[..n]),
        Err(error) => {
            if !LOGGED.swap(true, Ordering::Relaxed) {
                tracing::debug!(
                    %error,
                    "could not read a socket peer's supplementary groups (SO_PEERGROUPS needs Linux 4.13 or later): \
                     peers are matched by uid and primary gid only, and never widened to the instance role"
                );
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::*;

    fn set(groups: &[u32]) -> BTreeSet<u32> {
        groups.iter().copied().collect()
    }

    #[test]
    fn a_socket_pair_reports_this_process_s_own_groups() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let own: Vec<u32> = rustix::process::getgroups()
            .expect("getgroups")
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        for end in [&a, &b] {
            let read = read(end).expect("SO_PEERGROUPS on a socket pair");
            // Into a reused buffer longer than the groups: only the first
            // `n` are this peer's.
            let mut buffer = vec![u32::MAX; 1000];
            let n = read_into(end, &mut buffer).expect("SO_PEERGROUPS into a reused buffer");
            assert_eq!(&buffer[..n], &read[..], "read_into and read disagree");
            assert_eq!(
                set(&read),
                set(&own),
                "expected this process's supplementary groups {own:?} (primary gid {}), read {read:?}",
                rustix::process::getgid().as_raw()
            );
        }
    }

    #[test]
    fn a_socket_without_a_peer_is_an_error_and_read_or_none_gives_none() {
        let unconnected = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        let error = read(&unconnected).expect_err("an unconnected socket has no peer");
        assert_eq!(
            error.raw_os_error(),
            Some(libc::ENODATA),
            "expected ENODATA (no peer credentials), got {error:?}"
        );
        assert_eq!(read_or_none(&unconnected, &mut Vec::new()), None);
        let file = tempfile::tempfile().expect("temp file");
        let error = read(&file).expect_err("a file is no socket");
        assert_eq!(error.raw_os_error(), Some(libc::ENOTSOCK), "{error:?}");
    }

    /// A peer with many groups: the first buffer is too small, the kernel
    /// answers ERANGE with the size it needs, and every group is read.
    /// The groups are the connecting thread's, fixed at connect: changing
    /// them afterwards changes nothing the agent reads.
    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_peer_s_groups_are_those_it_had_at_connect() {
        use rustix::fs::Gid;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).expect("bind");
        let many: Vec<u32> = (0..FIRST_GUESS as u32 * 3).map(|i| 300_000 + i).collect();
        let primary = 299_999;
        let (connected, changed) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let peer = {
            let many = many.clone();
            std::thread::spawn(move || {
                // Credentials are per thread on Linux: only this thread
                // takes on the groups (raw setgroups, as rustix does).
                let gids: Vec<Gid> = many.iter().map(|&g| Gid::from_raw(g)).collect();
                rustix::thread::set_thread_groups(&gids).expect("setgroups");
                let g = Gid::from_raw(primary);
                rustix::thread::set_thread_res_gid(g, g, g).expect("setresgid");
                let stream = UnixStream::connect(&path).expect("connect");
                connected.0.send(()).unwrap();
                changed.1.recv().unwrap();
                rustix::thread::set_thread_groups(&[Gid::from_raw(7)]).expect("setgroups");
                drop(stream);
            })
        };
        let (accepted, _) = listener.accept().expect("accept");
        connected.1.recv().unwrap();
        let first = read(&accepted).expect("SO_PEERGROUPS");
        changed.0.send(()).unwrap();
        peer.join().expect("the peer thread");
        let later = read(&accepted).expect("SO_PEERGROUPS after the peer changed its groups");
        assert_eq!(
            first,
            many,
            "expected the {} groups the peer had at connect",
            many.len()
        );
        assert_eq!(later, many, "the groups the peer had at connect, not now");
        assert!(
            !first.contains(&primary),
            "the primary gid is not a supplementary group here: {first:?}"
        );
    }
}
