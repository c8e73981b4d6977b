//! Socket activation: the listening sockets systemd passes (`LISTEN_FDS`),
//! told apart by the names it gives them (`LISTEN_FDNAMES`, from each socket
//! unit's `FileDescriptorName=`, by default the unit's name).
//!
//! Two kinds are taken, and nothing else:
//!
//! - **`credentials`**: the credential socket, a Unix stream listener
//!   (`imds-agent.socket`). Its default name `imds-agent.socket`, and
//!   `unknown` (what a manager that names nothing stands for), mean the
//!   same, so the unit needs no `FileDescriptorName=` and a lone unnamed
//!   socket works as it always did. At most one.
//! - **`container`**: the container endpoint, a TCP listener on loopback or
//!   on the container link (169.254.170.23 or fd00:ec2::23), as
//!   `imds-agent-container.socket` binds it. One per address family, or
//!   more: the endpoint serves every one it is given. systemd binds them,
//!   so port 80 costs the agent no capability.
//!
//! Each socket is checked before it is used: a listener of the right kind,
//! and for `container` an address the endpoint accepts. A TCP socket on any
//! other address (`0.0.0.0:80`, say) would serve the instance's credentials
//! to the network, and is refused with the address in the error, as
//! `--container-endpoint` refuses it.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use anyhow::{Context, bail};

/// The name (`FileDescriptorName=`) of the credential socket.
pub const CREDENTIALS_NAME: &str = "credentials";

/// The name (`FileDescriptorName=`) of the container endpoint's sockets.
pub const CONTAINER_NAME: &str = "container";

/// Names that also mean the credential socket: `imds-agent.socket`'s
/// default name, and what stands for no name at all.
const CREDENTIALS_ALIASES: [&str; 2] = ["imds-agent.socket", "unknown"];

/// The sockets systemd passed, sorted by their use.
#[derive(Debug, Default)]
pub struct Activated {
    /// The credential socket, used instead of binding `--socket`.
    pub socket: Option<UnixListener>,
    /// The container endpoint's listeners, used instead of binding
    /// `--container-endpoint`. Empty when none was passed.
    pub container: Vec<TcpListener>,
}

impl Activated {
    /// Takes every socket in `fds`, named by `names` (the value of
    /// `LISTEN_FDNAMES`, read before anything else runs; `None` when it was
    /// not set). Fails, naming the socket and the fix, on a socket of an
    /// unknown name, of the wrong kind, or (for the container endpoint) on
    /// an address the endpoint refuses.
    pub fn take(fds: &mut listenfd::ListenFd, names: Option<&str>) -> anyhow::Result<Self> {
        let count = fds.len();
        let mut activated = Self::default();
        if count == 0 {
            return Ok(activated);
        }
        let names: Vec<&str> = match names {
            Some(names) => names.split(':').collect(),
            None => vec!["unknown"; count],
        };
        if names.len() != count {
            bail!(
                "systemd passed {count} sockets (LISTEN_FDS) but named {} (LISTEN_FDNAMES={:?}): \
                 start the agent from its units, or give one name per socket",
                names.len(),
                names.join(":")
            );
        }
        for (index, name) in names.into_iter().enumerate() {
            // systemd passes its sockets from fd 3 on.
            let fd = 3 + index;
            if name == CONTAINER_NAME {
                activated
                    .container
                    .push(container_listener(fds, index, fd)?);
            } else if name == CREDENTIALS_NAME || CREDENTIALS_ALIASES.contains(&name) {
                let listener = credential_socket(fds, index, fd, name)?;
                if activated.socket.replace(listener).is_some() {
                    bail!(
                        "systemd passed more than one credential socket (a second one, named \
                         {name:?}, is fd {fd}): give the socket unit one ListenStream= path, and \
                         name any other socket unit's sockets \"{CONTAINER_NAME}\" \
                         (FileDescriptorName=)"
                    );
                }
            } else {
                bail!(
                    "systemd passed a socket named {name:?} (fd {fd}, LISTEN_FDNAMES) that \
                     imds-agent does not take: name the credential socket \
                     \"{CREDENTIALS_NAME}\" (a Unix socket, imds-agent.socket) and the container \
                     endpoint's sockets \"{CONTAINER_NAME}\" (TCP, imds-agent-container.socket) \
                     with FileDescriptorName= in the socket unit"
                );
            }
        }
        Ok(activated)
    }
}

/// The socket at `index` as the credential socket: a listening Unix stream socket.
fn credential_socket(
    fds: &mut listenfd::ListenFd,
    index: usize,
    fd: usize,
    name: &str,
) -> anyhow::Result<UnixListener> {
    let Ok(Some(listener)) = fds.take_unix_listener(index) else {
        bail!(
            "the socket systemd passed as the credential socket (fd {fd}, named {name:?}) is \
             not a Unix stream socket: imds-agent.socket must have one ListenStream=PATH; name a \
             TCP socket for the container endpoint \"{CONTAINER_NAME}\" (FileDescriptorName=)"
        );
    };
    ensure_listening(&listener, fd, name)?;
    Ok(listener)
}

/// The socket at `index` as a container endpoint listener: a listening TCP
/// socket on an address the endpoint accepts.
fn container_listener(
    fds: &mut listenfd::ListenFd,
    index: usize,
    fd: usize,
) -> anyhow::Result<TcpListener> {
    let Ok(Some(listener)) = fds.take_tcp_listener(index) else {
        bail!(
            "the socket systemd passed as \"{CONTAINER_NAME}\" (fd {fd}) is not a TCP socket: \
             the container endpoint's socket unit must listen on an address and port \
             (ListenStream=169.254.170.23:80, ListenStream=[fd00:ec2::23]:80)"
        );
    };
    ensure_listening(&listener, fd, CONTAINER_NAME)?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("reading the address of the socket passed as fd {fd}"))?;
    if !crate::container::is_accepted(addr.ip()) {
        bail!(
            "the socket systemd passed as \"{CONTAINER_NAME}\" (fd {fd}) listens on {addr}, which \
             is refused: it would serve credentials to the network. ListenStream= in \
             imds-agent-container.socket must be the container link's 169.254.170.23:PORT or \
             [fd00:ec2::23]:PORT, or a loopback address (see README, \"Containers\")"
        );
    }
    Ok(listener)
}

/// Refuses a socket that is not listening (a connected one, say).
fn ensure_listening(socket: &impl std::os::fd::AsFd, fd: usize, name: &str) -> anyhow::Result<()> {
    let listening = rustix::net::sockopt::socket_acceptconn(socket)
        .with_context(|| format!("checking the socket systemd passed as fd {fd} ({name:?})"))?;
    if !listening {
        bail!(
            "the socket systemd passed as fd {fd} ({name:?}) is not listening: pass a listening \
             socket (a socket unit's ListenStream=, without Accept=yes)"
        );
    }
    Ok(())
}
