//! Paths are opened, never trusted.
//!
//! The agent runs as root or as a service user and writes secrets. Every path
//! it is given may lie in a directory another local user can write, and that
//! user may have planted something there: a symlink to `/etc/shadow`, a FIFO,
//! a link to `/dev/zero`, a file held open, a look-alike temp file. So the
//! agent never hands a path to the kernel and trusts what comes back. It
//! opens the *directory* once, checks it, and from then on works only through
//! that descriptor (`openat`, `renameat`, `unlinkat`, `fstat`, `fchmod`,
//! `fchown`): a name swapped after the check cannot redirect a write.
//!
//! # The rules
//!
//! *Trusted users* are root and the agent's effective user. For outputs,
//! the `--file-owner` user (the *file owner*) is also accepted as the owner
//! of the output directory and of the output file (see [`Trust`]).
//!
//! - **Walking a path.** Each component is opened with
//!   `openat(O_PATH | O_NOFOLLOW)` from the one before. A symlink is followed
//!   only when it is owned by a trusted user, and from then on every
//!   directory it leads through must be owned by a trusted user too (the file
//!   owner does not count there). At most 40 links are followed. So a link
//!   planted by someone else is refused wherever it is, which is stricter
//!   than the kernel's `fs.protected_symlinks` (that guards only sticky,
//!   world-writable directories, and lets root follow a link in a directory
//!   the link's owner owns). The agent never resolves links by hand.
//! - **The directory holding a file** must be owned by root, the agent's
//!   user or the file owner, and not writable by group or others. A
//!   group/other-writable directory with the sticky bit (like `/tmp`) is
//!   accepted, because there nobody can rename or remove a file they do not
//!   own; the files the agent uses in it must then be its own (checked on
//!   each open). Anything else is refused with an error naming the directory
//!   and the fix.
//! - **A file** is looked at with `fstatat(AT_SYMLINK_NOFOLLOW)` first, so a
//!   FIFO or a device is refused without being opened; then opened with
//!   `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`, and `fstat`ed again on the open
//!   descriptor (same inode as looked at): a regular file, owned by root, the
//!   agent's user or the file owner, one hard link, at most
//!   [`MAX_FILE_SIZE`] bytes. Otherwise it is an error, and nothing is read.
//!
//! # Using it
//!
//! [`open_dir`] (or [`open_dir_if_exists`], [`create_dir_all`]) gives a
//! [`TrustedDir`]; [`open_parent`] gives the directory and name of a file,
//! following a trusted symlink at the file's own name. Then, always through
//! the directory: [`TrustedDir::open_file`] (checked, `None` when absent),
//! [`TrustedDir::create_new`] (`O_EXCL | O_NOFOLLOW`, exact mode),
//! [`TrustedDir::open_lock`], [`TrustedDir::rename`],
//! [`TrustedDir::remove`], [`TrustedDir::sync`]. [`Trust::agent`] accepts
//! root and the agent's user; [`Trust::with_file_owner`] adds the output
//! files' owner.
//!
//! # Why the file owner may own the directory
//!
//! `--file-owner` names the user the credentials are for: that user can read
//! them anyway. In its own directory it can rename, remove or replace any
//! entry at any time, but every operation of the agent goes through the
//! directory descriptor opened once and through descriptors checked with
//! `fstat`: the user can make a write fail or remove its own file, never make
//! the agent read, chmod, chown or write another file, because symlinks it
//! owns are not followed, a hard link to someone else's file has a link count
//! of 2, and a FIFO or device is refused before it is read.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

/// The largest file the agent reads (credentials files are a few KiB).
pub const MAX_FILE_SIZE: u64 = 1 << 20;

/// The most symlinks followed while resolving one path (as the kernel's `MAXSYMLINKS`).
const MAX_LINKS: u32 = 40;

/// Whose files and directories are accepted: root, the agent's effective
/// user, and optionally the user the output files are given to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trust {
    euid: u32,
    file_owner: Option<u32>,
}

impl Trust {
    /// Root and the agent's effective user.
    pub fn agent() -> Self {
        Self {
            euid: rustix::process::geteuid().as_raw(),
            file_owner: None,
        }
    }

    /// Also accepts `uid` (the `--file-owner` user) as the owner of an output
    /// directory and of an output file, never of a symlink that is followed.
    pub fn with_file_owner(self, uid: Option<u32>) -> Self {
        Self {
            file_owner: uid,
            ..self
        }
    }

    /// The agent's effective uid.
    pub fn euid(&self) -> u32 {
        self.euid
    }

    /// The `--file-owner` uid, if any.
    pub fn file_owner(&self) -> Option<u32> {
        self.file_owner
    }

    /// Root or the agent's user.
    pub fn is_trusted(&self, uid: u32) -> bool {
        uid == 0 || uid == self.euid
    }

    /// Root, the agent's user or the file owner.
    pub fn may_own(&self, uid: u32) -> bool {
        self.is_trusted(uid) || self.file_owner == Some(uid)
    }

    fn owners_strict(&self) -> String {
        format!("root or the agent's user (uid {})", self.euid)
    }

    fn owners(&self) -> String {
        match self.file_owner {
            Some(owner) if !self.is_trusted(owner) => format!(
                "root, the agent's user (uid {}) or the --file-owner user (uid {owner})",
                self.euid
            ),
            _ => format!("root or the agent's user (uid {})", self.euid),
        }
    }
}

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity in `stat`.
    pub fn of(stat: &Stat) -> Self {
        Self {
            dev: stat.st_dev,
            ino: stat.st_ino,
        }
    }
}

/// A directory opened and checked by [`open_dir`], [`open_dir_if_exists`] or
/// [`create_dir_all`]; files in it are reached only through its descriptor.
#[derive(Debug)]
pub struct TrustedDir {
    fd: OwnedFd,
    path: PathBuf,
    id: FileId,
    owner: u32,
    shared: bool,
    trust: Trust,
}

/// A regular file opened through a [`TrustedDir`] and checked on its descriptor.
#[derive(Debug)]
pub struct CheckedFile {
    /// The open file (read-only, or read-write when asked).
    pub file: File,
    /// Its identity.
    pub id: FileId,
    /// Its permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Its owner.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Its size in bytes (at most [`MAX_FILE_SIZE`]).
    pub size: u64,
}

impl CheckedFile {
    /// The whole content, from the start; an error if it grew past
    /// [`MAX_FILE_SIZE`] since it was checked.
    pub fn read_all(&mut self, path: &Path) -> anyhow::Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(self.size as usize);
        (&self.file)
            .take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() as u64 > MAX_FILE_SIZE {
            bail!(
                "refusing {}: it is larger than {MAX_FILE_SIZE} bytes; a credentials file is a few KiB",
                path.display()
            );
        }
        Ok(bytes)
    }
}

/// What to do when a directory on the way does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    Error,
    Skip,
    Create,
}

/// Why giving a file or socket to another owner or group was refused, and
/// the fix: without `CAP_CHOWN` a process may give a file only to a group it
/// is in, and the packaged unit also filters the `chown` calls.
pub(crate) fn chown_refused(errno: rustix::io::Errno, what: &str) -> anyhow::Error {
    if errno == rustix::io::Errno::PERM {
        anyhow::anyhow!(
            "{what}: {errno}. Without CAP_CHOWN the agent may give a file only to a group it \
             is a member of. Fix: make the agent's user a member of that group (under \
             systemd: `systemctl edit imds-agent`, [Service] SupplementaryGroups=GROUP and \
             SystemCallFilter=@chown), or, for another owner, also grant CAP_CHOWN \
             (README, \"Outputs inside the sandbox\")"
        )
    } else {
        anyhow::Error::new(std::io::Error::from(errno)).context(what.to_owned())
    }
}

/// Opens and checks the directory `path` (see the module docs).
pub fn open_dir(path: &Path, trust: &Trust) -> anyhow::Result<TrustedDir> {
    let (dir, _) = walk(start(path)?, path, trust, Missing::Error, false)?
        .expect("Missing::Error never skips");
    Ok(dir)
}

/// As [`open_dir`], but `Ok(None)` when the directory (or one above it) does not exist.
pub fn open_dir_if_exists(path: &Path, trust: &Trust) -> anyhow::Result<Option<TrustedDir>> {
    Ok(walk(start(path)?, path, trust, Missing::Skip, false)?.map(|(dir, _)| dir))
}

/// As [`open_dir`], creating each missing directory with `mkdirat`, mode
/// exactly 0700 whatever the umask, each checked like the rest.
pub fn create_dir_all(path: &Path, trust: &Trust) -> anyhow::Result<TrustedDir> {
    let (dir, _) = walk(start(path)?, path, trust, Missing::Create, false)?
        .expect("Missing::Create never skips");
    Ok(dir)
}

/// The checked directory that holds the file `path` names, and the file's
/// name in it. A symlink at `path` itself is followed by the rules in the
/// module docs (to the file it names, so the link stays as it is); `Ok(None)`
/// when a directory on the way does not exist and `create` is false.
pub fn open_parent(
    path: &Path,
    trust: &Trust,
    create: bool,
) -> anyhow::Result<Option<(TrustedDir, OsString)>> {
    let missing = if create {
        Missing::Create
    } else {
        Missing::Skip
    };
    let (parent, name) = split(path)?;
    let Some((mut dir, mut links)) = walk(start(path)?, parent, trust, missing, false)? else {
        return Ok(None);
    };
    let mut name = name.to_owned();
    loop {
        let link_path = dir.path.join(&name);
        // Looked at through a descriptor of the entry itself, so the link
        // read is the link whose owner is checked.
        let link = match rustix::fs::openat(
            &dir.fd,
            &name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(Some((dir, name))),
            Err(e) => return Err(e).with_context(|| format!("opening {}", link_path.display())),
        };
        let stat = rustix::fs::fstat(&link)
            .with_context(|| format!("examining {}", link_path.display()))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::Symlink {
            return Ok(Some((dir, name)));
        }
        links += 1;
        if links > MAX_LINKS {
            bail!(
                "{} is a chain of more than {MAX_LINKS} symlinks (a loop?)",
                path.display()
            );
        }
        let target = read_link(link.as_fd(), OsStr::new(""), &link_path)?;
        if !trust.is_trusted(stat.st_uid) {
            bail!(
                "refusing to follow the symlink {} -> {}: it is owned by uid {}, not by {}. \
                 Another user may have planted it to make the agent write over another file. \
                 Fix: remove it, or point the agent at the real file",
                link_path.display(),
                target.display(),
                stat.st_uid,
                trust.owners_strict()
            );
        }
        let (target_parent, target_name) = split(&target)?;
        let from = if target.is_absolute() {
            start(&target)?
        } else {
            Start {
                fd: open_path(dir.fd.as_fd(), OsStr::new("."), &dir.path)?,
                shown: dir.path.clone(),
            }
        };
        let Some((next, used)) = walk_counted(from, target_parent, trust, missing, true, links)?
        else {
            return Ok(None);
        };
        dir = next;
        links = used;
        name = target_name.to_owned();
    }
}

/// The parent directory and file name of `path`.
fn split(path: &Path) -> anyhow::Result<(&Path, &OsStr)> {
    match path.components().next_back() {
        Some(Component::Normal(name)) => Ok((
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
            name,
        )),
        _ => bail!("{} names no file", path.display()),
    }
}

/// Where a walk starts: `/` for an absolute path, the working directory otherwise.
struct Start {
    fd: OwnedFd,
    shown: PathBuf,
}

fn start(path: &Path) -> anyhow::Result<Start> {
    let shown = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        PathBuf::new()
    };
    let root = if path.is_absolute() { "/" } else { "." };
    Ok(Start {
        fd: open_path(CWD, OsStr::new(root), Path::new(root))?,
        shown,
    })
}

fn open_path(dirfd: impl AsFd, name: &OsStr, shown: &Path) -> anyhow::Result<OwnedFd> {
    rustix::fs::openat(
        dirfd,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", shown.display()))
}

fn read_link(dirfd: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> anyhow::Result<PathBuf> {
    let target = rustix::fs::readlinkat(dirfd, name, Vec::new())
        .with_context(|| format!("reading the symlink {}", shown.display()))?;
    Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
}

fn walk(
    from: Start,
    path: &Path,
    trust: &Trust,
    missing: Missing,
    strict: bool,
) -> anyhow::Result<Option<(TrustedDir, u32)>> {
    walk_counted(from, path, trust, missing, strict, 0)
}

/// Walks the directory `path` from `from`, one `openat(O_PATH|O_NOFOLLOW)`
/// per component. `strict`: a symlink was followed to get here, so every
/// directory passed must be owned by root or the agent. `links`: symlinks
/// followed so far. Returns the checked directory and the new link count.
fn walk_counted(
    from: Start,
    path: &Path,
    trust: &Trust,
    missing: Missing,
    mut strict: bool,
    mut links: u32,
) -> anyhow::Result<Option<(TrustedDir, u32)>> {
    let Start {
        fd: mut current,
        mut shown,
    } = from;
    let mut queue: VecDeque<OsString> = components(path);
    while let Some(name) = queue.pop_front() {
        let here = shown.join(&name);
        let next = match rustix::fs::openat(
            &current,
            &name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => match missing {
                Missing::Skip => return Ok(None),
                Missing::Error => bail!("the directory {} does not exist", here.display()),
                Missing::Create => make_dir(&current, &name, &here, trust)?,
            },
            Err(e) => {
                return Err(e).with_context(|| format!("opening {}", here.display()));
            }
        };
        let stat =
            rustix::fs::fstat(&next).with_context(|| format!("examining {}", here.display()))?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    bail!(
                        "{} is a chain of more than {MAX_LINKS} symlinks (a loop?)",
                        path.display()
                    );
                }
                let target = read_link(next.as_fd(), OsStr::new(""), &here)?;
                if !trust.is_trusted(stat.st_uid) {
                    bail!(
                        "refusing to follow the symlink {} -> {}: it is owned by uid {}, not by {}. \
                         Another user may have planted it. Fix: remove it, or give the real path",
                        here.display(),
                        target.display(),
                        stat.st_uid,
                        trust.owners_strict()
                    );
                }
                if target.is_absolute() {
                    let Start { fd, shown: s } = start(&target)?;
                    current = fd;
                    shown = s;
                }
                for part in components(&target).into_iter().rev() {
                    queue.push_front(part);
                }
                strict = true;
            }
            FileType::Directory => {
                if strict && !trust.is_trusted(stat.st_uid) {
                    bail!(
                        "refusing the directory {}, reached through a symlink: it is owned by uid {}, \
                         not by {}. A symlink is followed only through directories root or the agent owns. \
                         Fix: give the real path",
                        here.display(),
                        stat.st_uid,
                        trust.owners_strict()
                    );
                }
                current = next;
                if name == ".." {
                    match shown.components().next_back() {
                        Some(Component::Normal(_)) => {
                            shown.pop();
                        }
                        Some(Component::RootDir) => {}
                        _ => shown.push(".."),
                    }
                } else {
                    shown = here;
                }
            }
            _ => bail!("{} is not a directory", here.display()),
        }
    }
    let shown = if shown.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        shown
    };
    let fd = rustix::fs::openat(
        &current,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening the directory {}", shown.display()))?;
    let stat = rustix::fs::fstat(&fd).with_context(|| format!("examining {}", shown.display()))?;
    let shared = check_dir(&stat, &shown, trust)?;
    Ok(Some((
        TrustedDir {
            fd,
            path: shown,
            id: FileId::of(&stat),
            owner: stat.st_uid,
            shared,
            trust: *trust,
        },
        links,
    )))
}

/// The names to open one after another (`.` dropped, `..` kept).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// `mkdirat(name, 0700)` in `parent`, then the mode set exactly (the umask
/// may have narrowed it). Someone else creating it first is fine: what is
/// there is checked like any other directory.
fn make_dir(
    parent: &OwnedFd,
    name: &OsStr,
    shown: &Path,
    trust: &Trust,
) -> anyhow::Result<OwnedFd> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => {
            let dir = rustix::fs::openat(
                parent,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .with_context(|| format!("opening the new directory {}", shown.display()))?;
            let stat = rustix::fs::fstat(&dir)?;
            if stat.st_uid == trust.euid() {
                rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700))
                    .with_context(|| format!("setting the mode of {}", shown.display()))?;
            }
        }
        Err(Errno::EXIST) => {}
        Err(e) => {
            return Err(e).with_context(|| format!("creating the directory {}", shown.display()));
        }
    }
    open_path(parent, name, shown)
}

/// The directory rule (module docs). Returns whether it is a shared sticky directory.
fn check_dir(stat: &Stat, path: &Path, trust: &Trust) -> anyhow::Result<bool> {
    let mode = stat.st_mode & 0o7777;
    if !trust.may_own(stat.st_uid) {
        bail!(
            "refusing the directory {}: it is owned by uid {}, not by {}; that user could replace \
             the files the agent reads and writes there. Fix: use a directory only root and the agent \
             can write (e.g. /var/lib/imds-agent), or `chown` this one",
            path.display(),
            stat.st_uid,
            trust.owners()
        );
    }
    if mode & 0o022 == 0 {
        return Ok(false);
    }
    if mode & 0o1000 != 0 {
        return Ok(true);
    }
    bail!(
        "refusing the directory {}: its mode {mode:04o} lets {} write in it, so another user could \
         replace or remove the files the agent writes there. Fix: `chmod go-w {}`, or use a directory \
         only root and the agent can write",
        path.display(),
        if mode & 0o002 != 0 {
            "every user"
        } else {
            "its group"
        },
        path.display()
    )
}

/// A human name for a file type, for errors.
fn kind(file_type: FileType) -> &'static str {
    match file_type {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

impl TrustedDir {
    /// The path the directory was reached by (after symlinks), for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's identity.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// The directory's owner.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// Group- or other-writable with the sticky bit (like `/tmp`).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Whose files are accepted in it.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The directory descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `fstatat(name, AT_SYMLINK_NOFOLLOW)`; `None` when there is no such entry.
    pub fn stat(&self, name: &OsStr) -> anyhow::Result<Option<Stat>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("examining {}", self.show(name))),
        }
    }

    /// `self.path()/name`, for messages.
    pub fn show(&self, name: &OsStr) -> String {
        self.path.join(name).display().to_string()
    }

    /// Opens the file `name` (module docs: no symlink, FIFO or device is
    /// opened, and the open descriptor is checked); `None` when there is none.
    /// `write`: open it read-write (for writing in place).
    pub fn open_file(&self, name: &OsStr, write: bool) -> anyhow::Result<Option<CheckedFile>> {
        let Some(seen) = self.stat(name)? else {
            return Ok(None);
        };
        self.check_file(name, &seen)?;
        let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.show(name))),
        };
        let stat =
            rustix::fs::fstat(&fd).with_context(|| format!("examining {}", self.show(name)))?;
        if FileId::of(&stat) != FileId::of(&seen) {
            bail!(
                "refusing {}: it was replaced while the agent opened it (someone is changing it); \
                 will look again next time",
                self.show(name)
            );
        }
        self.check_file(name, &stat)?;
        Ok(Some(CheckedFile {
            file: File::from(fd),
            id: FileId::of(&stat),
            mode: stat.st_mode & 0o7777,
            uid: stat.st_uid,
            gid: stat.st_gid,
            size: stat.st_size as u64,
        }))
    }

    /// The file rule (module docs) on `stat` of the entry `name`.
    pub fn check_file(&self, name: &OsStr, stat: &Stat) -> anyhow::Result<()> {
        let shown = self.show(name);
        let file_type = FileType::from_raw_mode(stat.st_mode);
        if file_type != FileType::RegularFile {
            bail!(
                "refusing {shown}: it is {}, not a regular file; nothing was read or written. \
                 Another user may have put it there. Fix: remove it",
                kind(file_type)
            );
        }
        if !self.trust.may_own(stat.st_uid) {
            bail!(
                "refusing {shown}: it is owned by uid {}, not by {}; nothing was read or written. \
                 Another user may have created it to receive the credentials. Fix: remove it",
                stat.st_uid,
                self.trust.owners()
            );
        }
        if stat.st_nlink != 1 {
            bail!(
                "refusing {shown}: it has {} hard links, so it may be another file under a second \
                 name; nothing was read or written. Fix: remove it (the agent writes a new one)",
                stat.st_nlink
            );
        }
        if stat.st_size as u64 > MAX_FILE_SIZE {
            bail!(
                "refusing {shown}: it is {} bytes, more than {MAX_FILE_SIZE}; a credentials file \
                 is a few KiB. Fix: remove it or point the agent at another file",
                stat.st_size
            );
        }
        Ok(())
    }

    /// Creates `name` exclusively (never through a symlink), write-only,
    /// with exactly `mode` whatever the umask.
    pub fn create_new(&self, name: &OsStr, mode: u32) -> std::io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY
                | OFlags::CREATE
                | OFlags::EXCL
                | OFlags::NOFOLLOW
                | OFlags::NOCTTY
                | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode & 0o600),
        )?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        Ok(File::from(fd))
    }

    /// Opens, or creates (0600), the lock file `name`: never through a
    /// symlink, never blocking on a FIFO; it must be a regular file owned by
    /// root or the agent. Nothing is read from it or written to it.
    pub fn open_lock(&self, name: &OsStr) -> anyhow::Result<File> {
        let shown = self.show(name);
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY
                | OFlags::CREATE
                | OFlags::NOFOLLOW
                | OFlags::NONBLOCK
                | OFlags::NOCTTY
                | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("opening the lock file {shown}"))?;
        let stat = rustix::fs::fstat(&fd).with_context(|| format!("examining {shown}"))?;
        let file_type = FileType::from_raw_mode(stat.st_mode);
        if file_type != FileType::RegularFile {
            bail!(
                "refusing the lock file {shown}: it is {}, not a regular file. Fix: remove it",
                kind(file_type)
            );
        }
        if !self.trust.is_trusted(stat.st_uid) {
            bail!(
                "refusing the lock file {shown}: it is owned by uid {}, not by {}, so that user \
                 could hold the lock forever. Fix: remove it, and keep outputs in a directory only \
                 root and the agent can write",
                stat.st_uid,
                self.trust.owners_strict()
            );
        }
        Ok(File::from(fd))
    }

    /// `renameat(from, to)` within this directory.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> std::io::Result<()> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to)?;
        Ok(())
    }

    /// `unlinkat(name)`.
    pub fn remove(&self, name: &OsStr) -> std::io::Result<()> {
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?;
        Ok(())
    }

    /// `fsync` of the directory, so a rename or removal survives a crash.
    pub fn sync(&self) -> anyhow::Result<()> {
        rustix::fs::fsync(&self.fd)
            .with_context(|| format!("flushing the directory {}", self.path.display()))
    }

    /// The names in the directory (without `.` and `..`).
    pub fn names(&self) -> anyhow::Result<Vec<OsString>> {
        let dir = rustix::fs::Dir::read_from(&self.fd)
            .with_context(|| format!("listing {}", self.path.display()))?;
        let mut names = Vec::new();
        for entry in dir {
            let entry = entry.with_context(|| format!("listing {}", self.path.display()))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// Held by every test that changes the process-wide umask, so two of
    /// them never interleave their save and restore.
    pub(crate) static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `mkdir` with exactly `mode`, whatever umask another test has set.
    pub(crate) fn mkdir(path: &Path, mode: u32) {
        std::fs::create_dir(path).unwrap();
        chmod(path, mode);
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
    }

    fn message(result: anyhow::Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.expect_err("expected a refusal"))
    }

    #[test]
    fn a_group_or_other_writable_directory_is_refused_unless_sticky() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        mkdir(&dir, 0o755);
        chmod(&dir, 0o775);
        let err = message(open_dir(&dir, &Trust::agent()));
        assert!(
            err.contains("refusing the directory") && err.contains("chmod go-w"),
            "{err}"
        );
        chmod(&dir, 0o777);
        assert!(message(open_dir(&dir, &Trust::agent())).contains("every user"));
        chmod(&dir, 0o1777);
        assert!(open_dir(&dir, &Trust::agent()).unwrap().is_shared());
        chmod(&dir, 0o755);
        assert!(!open_dir(&dir, &Trust::agent()).unwrap().is_shared());
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_directory_owned_by_another_user_is_refused_unless_it_is_the_file_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("home");
        mkdir(&dir, 0o755);
        chown(&dir, 54321);
        let err = message(open_dir(&dir, &Trust::agent()));
        assert!(err.contains("owned by uid 54321"), "{err}");
        open_dir(&dir, &Trust::agent().with_file_owner(Some(54321))).unwrap();
    }

    #[test]
    fn a_symlink_to_a_directory_is_followed_when_ours_and_the_real_path_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        mkdir(&tmp.path().join("real"), 0o755);
        symlink("real", tmp.path().join("link")).unwrap();
        let dir = open_dir(&tmp.path().join("link"), &Trust::agent()).unwrap();
        assert_eq!(dir.path(), tmp.path().join("real"));
        let direct = open_dir(&tmp.path().join("real"), &Trust::agent()).unwrap();
        assert_eq!(dir.id(), direct.id());
        let up = open_dir(&tmp.path().join("real/../real/."), &Trust::agent()).unwrap();
        assert_eq!(up.id(), direct.id());
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_symlink_someone_else_owns_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        mkdir(&victim, 0o755);
        std::fs::write(victim.join("shadow"), "root:hash").unwrap();
        symlink(&victim, tmp.path().join("dirlink")).unwrap();
        chown(&tmp.path().join("dirlink"), 54321);
        let err = message(open_dir(&tmp.path().join("dirlink"), &Trust::agent()));
        assert!(
            err.contains("refusing to follow the symlink") && err.contains("uid 54321"),
            "{err}"
        );
        symlink(victim.join("shadow"), tmp.path().join("credentials")).unwrap();
        chown(&tmp.path().join("credentials"), 54321);
        let trust = Trust::agent().with_file_owner(Some(54321));
        let err = message(open_parent(&tmp.path().join("credentials"), &trust, false));
        assert!(err.contains("refusing to follow the symlink"), "{err}");
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_followed_symlink_may_only_lead_through_directories_root_or_the_agent_owns() {
        let tmp = tempfile::tempdir().unwrap();
        let theirs = tmp.path().join("theirs");
        mkdir(&theirs, 0o755);
        chown(&theirs, 54321);
        symlink("theirs/file", tmp.path().join("link")).unwrap();
        let trust = Trust::agent().with_file_owner(Some(54321));
        let err = message(open_parent(&tmp.path().join("link"), &trust, false));
        assert!(err.contains("reached through a symlink"), "{err}");
        // The same directory given directly is the file owner's, and accepted.
        open_parent(&theirs.join("file"), &trust, false)
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_fifo_a_device_link_and_a_hard_link_are_refused_without_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = open_dir(tmp.path(), &Trust::agent()).unwrap();
        rustix::fs::mknodat(
            dir.as_fd(),
            "fifo",
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = message(dir.open_file(OsStr::new("fifo"), false));
        assert!(err.contains("a FIFO"), "{err}");
        // O_NONBLOCK: a FIFO at the lock file's name does not block either.
        let err = message(dir.open_lock(OsStr::new("fifo")));
        assert!(err.contains("a FIFO"), "{err}");
        symlink("/dev/zero", tmp.path().join("zero")).unwrap();
        let err = message(dir.open_file(OsStr::new("zero"), false));
        assert!(err.contains("a symlink"), "{err}");
        // Followed (the link is ours), /dev/zero is a device: refused, not read.
        let (zdir, name) = open_parent(&tmp.path().join("zero"), &Trust::agent(), false)
            .unwrap()
            .unwrap();
        let err = message(zdir.open_file(&name, false));
        assert!(err.contains("a character device"), "{err}");
        std::fs::write(tmp.path().join("a"), "x").unwrap();
        std::fs::hard_link(tmp.path().join("a"), tmp.path().join("b")).unwrap();
        let err = message(dir.open_file(OsStr::new("b"), false));
        assert!(err.contains("2 hard links"), "{err}");
    }

    #[test]
    fn a_large_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let big = File::create(tmp.path().join("big")).unwrap();
        big.set_len(MAX_FILE_SIZE + 1).unwrap();
        let dir = open_dir(tmp.path(), &Trust::agent()).unwrap();
        let err = message(dir.open_file(OsStr::new("big"), false));
        assert!(err.contains("bytes, more than"), "{err}");
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_file_or_lock_file_owned_by_someone_else_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o1777);
        std::fs::write(tmp.path().join("credentials"), "planted").unwrap();
        chown(&tmp.path().join("credentials"), 54321);
        std::fs::write(tmp.path().join(".credentials.lock"), "").unwrap();
        chown(&tmp.path().join(".credentials.lock"), 54321);
        let dir = open_dir(tmp.path(), &Trust::agent()).unwrap();
        let err = message(dir.open_file(OsStr::new("credentials"), false));
        assert!(err.contains("owned by uid 54321"), "{err}");
        let err = message(dir.open_lock(OsStr::new(".credentials.lock")));
        assert!(err.contains("owned by uid 54321"), "{err}");
        // The file owner's own file is accepted; its lock file is not.
        let theirs = open_dir(tmp.path(), &Trust::agent().with_file_owner(Some(54321))).unwrap();
        assert!(
            theirs
                .open_file(OsStr::new("credentials"), false)
                .unwrap()
                .is_some()
        );
        assert!(theirs.open_lock(OsStr::new(".credentials.lock")).is_err());
    }

    #[test]
    fn missing_directories_are_created_0700_whatever_the_umask() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/c");
        assert!(
            open_dir_if_exists(&path, &Trust::agent())
                .unwrap()
                .is_none()
        );
        assert!(message(open_dir(&path, &Trust::agent())).contains("does not exist"));
        let _umask = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        let old = rustix::process::umask(Mode::from_raw_mode(0o077));
        let made = create_dir_all(&path, &Trust::agent());
        rustix::process::umask(Mode::from_raw_mode(0o000));
        let again = create_dir_all(&tmp.path().join("a/d"), &Trust::agent());
        rustix::process::umask(old);
        made.unwrap();
        again.unwrap();
        for sub in ["a", "a/b", "a/b/c", "a/d"] {
            let mode = std::fs::metadata(tmp.path().join(sub))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o700, "{sub}");
        }
    }

    #[test]
    fn a_symlink_loop_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        symlink("b", tmp.path().join("a")).unwrap();
        symlink("a", tmp.path().join("b")).unwrap();
        let err = message(open_parent(&tmp.path().join("a"), &Trust::agent(), false));
        assert!(err.contains("symlinks (a loop?)"), "{err}");
        let err = message(open_dir(&tmp.path().join("a"), &Trust::agent()));
        assert!(err.contains("symlinks (a loop?)"), "{err}");
    }
}
