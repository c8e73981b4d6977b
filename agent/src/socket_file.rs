//! The Unix socket's file: born with its final mode and group, removed at exit
//! only while it is still ours.
//!
//! `bind(2)` creates the socket file with mode `0777 & !umask`, and
//! `connect(2)` checks that mode. A socket bound at its final path and
//! `chmod`ed afterwards is therefore open to every local user for a moment,
//! and a `chmod`/`chown` by path follows whatever another user swapped in
//! meanwhile (a symlink to a root-owned file). So the socket is bound inside a
//! fresh private directory (mode 0700, random name, made beside the target
//! through the parent directory's descriptor), given its mode and group there,
//! where nobody else can reach or replace it, and only then renamed into
//! place: the name other users can see always carries the final mode.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rustix::fs::{AtFlags, FileType, Gid, Mode, RenameFlags};
use rustix::io::Errno;
use tokio::net::UnixListener;

use crate::trust::{self, FileId, Trust, TrustedDir};

/// The name of the socket inside the private directory; renamed away at once.
const INNER_NAME: &str = "agent.sock";

/// How many random names to try for the private directory before giving up.
const PRIVATE_DIR_ATTEMPTS: usize = 8;

/// The socket file the agent created: the directory holding it (open) and
/// the identity (device, inode) of the file, so that removing it at exit
/// removes our socket and never a file someone put there since.
#[derive(Debug)]
pub struct SocketFile {
    dir: TrustedDir,
    name: OsString,
    path: PathBuf,
    id: FileId,
}

impl SocketFile {
    /// The path the socket was bound at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file, if the name still holds the socket we bound.
    pub fn remove(self) {
        match self.dir.stat(&self.name) {
            Ok(Some(stat)) if FileId::of(&stat) == self.id => {
                if let Err(e) = self.dir.remove(&self.name) {
                    tracing::warn!(path = %self.path.display(), error = %e, "removing the socket file");
                }
            }
            Ok(Some(_)) => tracing::warn!(
                path = %self.path.display(),
                "the socket path now holds another file; left as it is"
            ),
            Ok(None) | Err(_) => {}
        }
    }
}

/// Binds the socket at `path` with `mode` (and `group`) from its first
/// instant. A stale socket at `path` is replaced; anything else there (a
/// file, a symlink, a directory, or a socket another user made) is an error
/// and is left untouched. The directory holding `path` must be one only the
/// agent's user or root can write, or a sticky one like `/tmp` (the rules of
/// [`crate::trust`]); when it does not exist it is created, mode 0755 so that
/// the socket's own mode decides who may connect (directories above it that
/// are missing too are created 0700).
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> anyhow::Result<(UnixListener, SocketFile)> {
    let Some(name) = path.file_name() else {
        bail!(
            "--socket {}: give the path of a socket file, such as /run/imds-agent/agent.sock",
            path.display()
        );
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = socket_dir(parent)?;
    let stale = existing_socket(&dir, name)?;
    let private = PrivateDir::create(&dir, path)?;
    let listener = private.bind(mode, group, path)?;
    let stat = rustix::fs::statat(&private.fd, INNER_NAME, AtFlags::SYMLINK_NOFOLLOW)
        .with_context(|| format!("checking the new socket for {}", path.display()))?;
    // A stale socket is replaced in one step; when nothing was there, a file
    // that appeared since is not replaced (RENAME_NOREPLACE).
    let flags = if stale {
        RenameFlags::empty()
    } else {
        RenameFlags::NOREPLACE
    };
    match rustix::fs::renameat_with(&private.fd, INNER_NAME, dir.as_fd(), name, flags) {
        Ok(()) => {}
        Err(Errno::EXIST) => bail!(
            "{} appeared while the agent was starting; refusing to replace it",
            path.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("moving the socket into {}", path.display()));
        }
    }
    drop(private);
    let file = SocketFile {
        dir,
        name: name.to_owned(),
        path: path.to_owned(),
        id: FileId::of(&stat),
    };
    Ok((listener, file))
}

/// Opens (or creates) and checks the socket's directory.
fn socket_dir(parent: &Path) -> anyhow::Result<TrustedDir> {
    let trust = Trust::agent();
    if let Some(dir) = trust::open_dir_if_exists(parent, &trust)? {
        return Ok(dir);
    }
    let dir = trust::create_dir_all(parent, &trust)?;
    let stat = rustix::fs::fstat(dir.as_fd())
        .with_context(|| format!("examining {}", parent.display()))?;
    if stat.st_uid == trust.euid() {
        rustix::fs::fchmod(dir.as_fd(), Mode::from_raw_mode(0o755))
            .with_context(|| format!("setting the mode of {} to 0755", parent.display()))?;
    }
    Ok(dir)
}

/// True when `name` is a stale socket of ours or root's (to be replaced),
/// false when nothing is there; an error for anything else.
fn existing_socket(dir: &TrustedDir, name: &OsStr) -> anyhow::Result<bool> {
    let Some(stat) = dir.stat(name)? else {
        return Ok(false);
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Socket {
        bail!(
            "{} exists and is not a socket; refusing to replace it. Fix: remove it, or choose another --socket path",
            dir.show(name)
        );
    }
    if !dir.trust().is_trusted(stat.st_uid) {
        bail!(
            "{} is a socket owned by uid {}, not by root or the agent's user; refusing to replace it. \
             Fix: remove it, and keep the socket in a directory only root and the agent can write",
            dir.show(name),
            stat.st_uid
        );
    }
    Ok(true)
}

/// A fresh 0700 directory beside the target, removed (with anything left in
/// it) when dropped.
struct PrivateDir<'a> {
    parent: &'a TrustedDir,
    name: String,
    fd: OwnedFd,
}

impl<'a> PrivateDir<'a> {
    fn create(parent: &'a TrustedDir, path: &Path) -> anyhow::Result<Self> {
        for _ in 0..PRIVATE_DIR_ATTEMPTS {
            let name = format!(".imds-agent-socket-{:016x}", rand::random::<u64>());
            match rustix::fs::mkdirat(parent.as_fd(), name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(Errno::EXIST) => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating a private directory beside {}", path.display())
                    });
                }
            }
            let fd = rustix::fs::openat(
                parent.as_fd(),
                name.as_str(),
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                Mode::empty(),
            );
            // Exactly 0700 whatever the umask (a umask of 0777 would lock the agent out).
            let fd = fd.and_then(|fd| {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))?;
                Ok(fd)
            });
            match fd {
                Ok(fd) => return Ok(Self { parent, name, fd }),
                Err(e) => {
                    let _ = rustix::fs::unlinkat(parent.as_fd(), name.as_str(), AtFlags::REMOVEDIR);
                    return Err(e).with_context(|| {
                        format!("opening a private directory beside {}", path.display())
                    });
                }
            }
        }
        bail!(
            "could not create a private directory beside {} ({PRIVATE_DIR_ATTEMPTS} names taken)",
            path.display()
        )
    }

    /// Binds the socket inside this directory, reached through its
    /// descriptor (`/proc/self/fd/N`): no path another user could swap is
    /// resolved. Its group and mode are set there too.
    fn bind(&self, mode: u32, group: Option<u32>, path: &Path) -> anyhow::Result<UnixListener> {
        let inner = format!("/proc/self/fd/{}/{INNER_NAME}", self.fd.as_raw_fd());
        let listener = std::os::unix::net::UnixListener::bind(&inner).with_context(|| {
            format!(
                "binding the socket for {} (in a private directory reached through /proc/self/fd, which must be mounted)",
                path.display()
            )
        })?;
        if let Some(gid) = group {
            rustix::fs::chownat(
                &self.fd,
                INNER_NAME,
                None,
                Some(Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| {
                crate::trust::chown_refused(
                    e,
                    &format!("setting the group of {} to {gid}", path.display()),
                )
            })?;
        }
        rustix::fs::chmodat(
            &self.fd,
            INNER_NAME,
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )
        .with_context(|| format!("setting the mode of {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("preparing the socket")?;
        UnixListener::from_std(listener).context("registering the socket")
    }
}

impl Drop for PrivateDir<'_> {
    fn drop(&mut self) {
        // Empty once the socket was renamed away; holds it after a failure.
        let _ = rustix::fs::unlinkat(&self.fd, INNER_NAME, AtFlags::empty());
        let _ = rustix::fs::unlinkat(self.parent.as_fd(), self.name.as_str(), AtFlags::REMOVEDIR);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A directory with an exact mode, whatever umask a concurrent test set
    /// (the trust rules refuse one others could write).
    fn test_dir(tmp: &tempfile::TempDir) -> PathBuf {
        let dir = tmp.path().join("d");
        crate::trust::tests::mkdir(&dir, 0o755);
        dir
    }

    fn entries(dir: &Path) -> Vec<OsString> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_but_another_file_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = test_dir(&tmp);
        let path = dir.join("agent.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a stale socket file is left behind");
        let (listener, file) = bind(&path, 0o600, None).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(entries(&dir), ["agent.sock"], "no private dir left");
        std::os::unix::net::UnixStream::connect(&path).expect("the socket accepts connections");
        drop(listener);
        file.remove();
        assert!(!path.exists(), "our socket is removed");

        let file = dir.join("precious");
        std::fs::write(&file, "data").unwrap();
        let err = bind(&file, 0o600, None).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
        assert_eq!(entries(&dir), ["precious"], "no private dir left");
    }

    #[tokio::test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    async fn in_a_shared_sticky_directory_another_users_socket_or_symlink_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        crate::trust::tests::mkdir(&dir, 0o1777);
        let theirs = dir.join("theirs.sock");
        drop(std::os::unix::net::UnixListener::bind(&theirs).unwrap());
        std::os::unix::fs::lchown(&theirs, Some(54321), None).unwrap();
        let err = format!("{:#}", bind(&theirs, 0o600, None).unwrap_err());
        assert!(err.contains("owned by uid 54321"), "{err}");
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let err = format!("{:#}", bind(&link, 0o600, None).unwrap_err());
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(
            entries(&dir),
            ["link.sock", "theirs.sock"],
            "both left as they were"
        );
        // Our own socket is fine there.
        let (_listener, file) = bind(&dir.join("ours.sock"), 0o600, None).unwrap();
        file.remove();
    }

    #[tokio::test]
    async fn a_file_put_in_place_of_our_socket_is_not_removed_at_exit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = test_dir(&tmp);
        let path = dir.join("agent.sock");
        let (_listener, file) = bind(&path, 0o600, None).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        file.remove();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");
    }
}
