//! Replacing a file so that no reader ever sees a partial or mixed file, and
//! no other user can turn the write against another file.
//!
//! Every step goes through the output's directory, opened and checked once
//! by [`crate::trust`] (read its module docs for the rules): nothing at the
//! output path is followed, opened or removed on a name's word alone.
//!
//! 1. Writers (two agents, or an agent and a person's script) are serialised
//!    by an `flock` on a sibling `.NAME.lock` file, taken with `LOCK_NB` and
//!    retried for at most [`LOCK_WAIT`]: a lock held forever is an error
//!    naming the lock file and its holder, never a stalled agent.
//! 2. The target is read under that lock, just before merging, so no
//!    concurrent edit is lost; it is opened `O_NOFOLLOW | O_NONBLOCK` and
//!    checked on the descriptor (a regular file of ours, one link, small).
//! 3. The new content goes to a temporary file created in the same directory
//!    with `O_EXCL | O_NOFOLLOW` under a random name, with its final mode
//!    (set with `fchmod`, so the umask cannot widen or narrow it) and owner
//!    (`fchown`), written, `fsync`ed, renamed over the target with
//!    `renameat`, and the directory is `fsync`ed. A reader opens either the
//!    old inode or the new one, never a half-written file.
//!
//! An [`Output`] also remembers the file it last wrote (device, inode and a
//! keyed digest of the content), so that withdrawing the credentials removes
//! that file and never one put in its place, and removes its own temp files
//! left by a killed run.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rustix::fs::{FileType, FlockOperation, flock};
use rustix::io::Errno;

use crate::trust::{self, CheckedFile, FileId, Trust, TrustedDir};

/// How long a writer waits for another to release the lock, at most.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The pause between two tries of the lock.
const LOCK_RETRY: Duration = Duration::from_millis(50);

/// Mode and ownership of an output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Permission bits, exactly (default 0600). Never group- or other-writable.
    pub mode: u32,
    /// New owner uid, if the agent may change it (needs CAP_CHOWN). This
    /// user is the one the credentials are for: it may also own the output
    /// directory and the file (see [`crate::trust`]).
    pub owner: Option<u32>,
    /// New group gid (the agent must be in it, or have CAP_CHOWN).
    pub group: Option<u32>,
    /// Write in place instead of renaming (for a bind-mounted target file).
    /// A reader may then see a partial file while it is written.
    pub in_place: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            mode: 0o600,
            owner: None,
            group: None,
            in_place: false,
        }
    }
}

impl FileOptions {
    /// Owner read-write, group read (0640), for handing the file to a group.
    pub fn group_readable() -> Self {
        Self {
            mode: 0o640,
            ..Self::default()
        }
    }

    /// Refuses a mode that lets the group or others write the file (they
    /// could plant credentials of their own), or others read it, or that is
    /// not a plain permission mode.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.mode & !0o777 != 0 {
            bail!(
                "file mode {:04o} is not a plain permission mode (at most 0777): use 0600 or 0640",
                self.mode
            );
        }
        if self.mode & 0o022 != 0 {
            bail!(
                "file mode {:04o} would let the group or other users write the credentials file \
                 (and plant credentials of their own): use 0600 or 0640",
                self.mode
            );
        }
        if self.mode & 0o007 != 0 {
            bail!(
                "file mode {:04o} would let every user read the credentials: use 0600 or 0640",
                self.mode
            );
        }
        Ok(())
    }

    /// Whose directories and files are accepted for this output.
    pub fn trust(&self) -> Trust {
        Trust::agent().with_file_owner(self.owner)
    }
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The content was already right: nothing was written.
    Unchanged,
    /// The file was replaced.
    Written,
    /// The file was removed (emptied, in place).
    Removed,
    /// The file is not the one this output wrote: it was left as it is.
    LeftAlone,
}

/// What an output wrote last: the file, and a keyed digest of its content
/// (an inode number alone may be reused by the next file created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    id: FileId,
    digest: u64,
}

/// What a withdrawal may touch: the file last written (`mark`), and, for a
/// whole-file output, only while it still holds what was written.
#[derive(Debug, Clone, Copy)]
struct Expect {
    mark: Option<Mark>,
    whole_file: bool,
}

/// A file output: [`update_file`] plus the memory of the file it wrote.
#[derive(Debug)]
pub struct Output {
    path: PathBuf,
    options: FileOptions,
    whole_file: bool,
    hasher: RandomState,
    written: Mutex<Option<Mark>>,
}

impl Output {
    /// An output that owns the whole file at `path` (the JSON document): a
    /// withdrawal removes it only while it is the file written last and
    /// still holds what was written. `options` are checked with
    /// [`FileOptions::check`].
    pub fn new(path: PathBuf, options: FileOptions) -> anyhow::Result<Self> {
        Self::build(path, options, true)
    }

    /// An output owning part of a file others may edit too (one profile of a
    /// shared-credentials file): a withdrawal edits it only while it is the
    /// file written last (same inode), whatever was changed around our part.
    pub fn shared(path: PathBuf, options: FileOptions) -> anyhow::Result<Self> {
        Self::build(path, options, false)
    }

    fn build(path: PathBuf, options: FileOptions, whole_file: bool) -> anyhow::Result<Self> {
        options
            .check()
            .with_context(|| format!("the output {}", path.display()))?;
        Ok(Self {
            path,
            options,
            whole_file,
            hasher: RandomState::new(),
            written: Mutex::new(None),
        })
    }

    /// The path it was given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes what `merge` makes of the current content (see [`update_file`])
    /// and remembers the file written.
    pub fn publish(
        &self,
        merge: impl FnOnce(Option<&[u8]>) -> anyhow::Result<Option<Vec<u8>>>,
    ) -> anyhow::Result<Outcome> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let (outcome, now) = update(&self.path, &self.options, &self.hasher, None, merge)?;
        *written = now;
        Ok(outcome)
    }

    /// As [`Output::publish`], but only when the file at the path is the one
    /// this output last wrote: anything else (a file from before a restart,
    /// or one put in its place by someone) is left alone, and the reason logged.
    pub fn withdraw(
        &self,
        merge: impl FnOnce(Option<&[u8]>) -> anyhow::Result<Option<Vec<u8>>>,
    ) -> anyhow::Result<Outcome> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let expect = Expect {
            mark: *written,
            whole_file: self.whole_file,
        };
        let (outcome, now) = update(&self.path, &self.options, &self.hasher, Some(expect), merge)?;
        if outcome == Outcome::LeftAlone {
            tracing::warn!(
                path = %self.path.display(),
                "leaving the file in place on withdrawal: it is not the file this agent wrote \
                 (written before a restart, or replaced by someone else); remove it by hand if \
                 it holds credentials that should go"
            );
        } else {
            *written = now;
        }
        Ok(outcome)
    }

    /// Removes this output's own stale temp files: the temp-name pattern,
    /// owned by the agent, last modified before `started`. Another user's
    /// look-alike is never touched. Run once at start; a locked output is
    /// skipped (its writer may be alive). Returns how many were removed.
    ///
    /// An output directory that is refused is an error (a setting to fix
    /// before starting); a refused file in it (say a symlink someone planted)
    /// is only logged here: every write reports it, and the agent keeps
    /// serving its other outputs.
    pub fn remove_stale_temp_files(&self, started: SystemTime) -> anyhow::Result<usize> {
        let trust = self.options.trust();
        let parent = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if trust::open_dir_if_exists(parent, &trust)?.is_none() {
            return Ok(0);
        }
        let (dir, name) = match trust::open_parent(&self.path, &trust, false) {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(0),
            Err(e) => {
                tracing::warn!(
                    path = %self.path.display(),
                    cause = format!("{e:#}"),
                    "not looking for stale temp files: the output path is refused"
                );
                return Ok(0);
            }
        };
        let lock = match dir.open_lock(&lock_name(&name)) {
            Ok(lock) => lock,
            Err(e) => {
                tracing::warn!(
                    cause = format!("{e:#}"),
                    "not looking for stale temp files: the lock file is refused"
                );
                return Ok(0);
            }
        };
        if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            tracing::warn!(
                lock = %dir.show(&lock_name(&name)),
                "not looking for stale temp files now: another writer holds the lock"
            );
            return Ok(0);
        }
        let mut removed = 0;
        for entry in dir.names()? {
            if !is_temp_name(&name, &entry) {
                continue;
            }
            let Some(stat) = dir.stat(&entry)? else {
                continue;
            };
            let shown = dir.show(&entry);
            let mtime = SystemTime::UNIX_EPOCH
                + Duration::new(stat.st_mtime as u64, stat.st_mtime_nsec as u32);
            // Ours: created by the agent (its uid), or given to the file owner
            // in a directory nobody but root and the agent can write in.
            let ours = stat.st_uid == trust.euid()
                || (trust.file_owner() == Some(stat.st_uid)
                    && !dir.is_shared()
                    && trust.is_trusted(dir.owner()));
            if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile || !ours {
                tracing::info!(
                    path = %shown,
                    owner = stat.st_uid,
                    "leaving a file that looks like a temp file of ours but is not"
                );
                continue;
            }
            if mtime >= started {
                continue;
            }
            match dir.remove(&entry) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(path = %shown, "removed a temp file left by an earlier run");
                }
                Err(e) => {
                    tracing::warn!(path = %shown, cause = %e, "could not remove a stale temp file")
                }
            }
        }
        if removed > 0 {
            dir.sync()?;
        }
        Ok(removed)
    }
}

/// `.NAME.lock`.
fn lock_name(name: &OsStr) -> OsString {
    let mut lock = OsString::from(".");
    lock.push(name);
    lock.push(".lock");
    lock
}

/// `.NAME.tmp.PID.XXXXXXXXXXXXXXXX` (16 hex digits).
fn temp_name(name: &OsStr, suffix: u64) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".tmp.{}.{suffix:016x}", std::process::id()));
    temp
}

/// Whether `entry` has the shape of a [`temp_name`] for `name`.
fn is_temp_name(name: &OsStr, entry: &OsStr) -> bool {
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(name.as_bytes());
    prefix.extend_from_slice(b".tmp.");
    let Some(rest) = entry.as_bytes().strip_prefix(prefix.as_slice()) else {
        return false;
    };
    let Some((pid, suffix)) = std::str::from_utf8(rest)
        .ok()
        .and_then(|r| r.split_once('.'))
    else {
        return false;
    };
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && suffix.len() == 16
        && suffix.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
thread_local! {
    /// Temp-name suffixes a test wants used, in order, before random ones.
    static SUFFIXES: std::cell::RefCell<std::collections::VecDeque<u64>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

/// The random part of a temp file's name: a temp file left by a killed
/// agent (whose pid a restarted agent may reuse, e.g. as PID 1 in a
/// container), or planted by someone, never blocks a write.
fn temp_suffix() -> u64 {
    #[cfg(test)]
    if let Some(next) = SUFFIXES.with(|s| s.borrow_mut().pop_front()) {
        return next;
    }
    rand::random()
}

/// Reads the target under the lock, asks `merge` for the new content (`None`:
/// remove the file) and writes it atomically when it differs.
pub fn update_file(
    path: &Path,
    options: &FileOptions,
    merge: impl FnOnce(Option<&[u8]>) -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<Outcome> {
    Ok(update(path, options, &RandomState::new(), None, merge)?.0)
}

/// [`update_file`]. `expect`: this is a withdrawal, done only on the file
/// it names. Returns the outcome and the mark of the file now at the path,
/// if it is ours (`hasher` makes the digest).
fn update(
    path: &Path,
    options: &FileOptions,
    hasher: &RandomState,
    expect: Option<Expect>,
    merge: impl FnOnce(Option<&[u8]>) -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<(Outcome, Option<Mark>)> {
    let mark = |id: FileId, content: &[u8]| {
        Some(Mark {
            id,
            digest: hasher.hash_one(content),
        })
    };
    let trust = options.trust();
    // A withdrawal creates nothing: no directory, nothing to remove.
    let Some((dir, name)) = trust::open_parent(path, &trust, expect.is_none())? else {
        return Ok((Outcome::Unchanged, None));
    };
    let _lock = lock(&dir, &name)?;
    let mut existing = dir.open_file(&name, options.in_place)?;
    if let (Some(expect), Some(file)) = (expect, &existing)
        && expect.mark.map(|m| m.id) != Some(file.id)
    {
        return Ok((Outcome::LeftAlone, None));
    }
    let old = match &mut existing {
        Some(file) => Some(file.read_all(&dir.path().join(&name))?),
        None => None,
    };
    if let (Some(expect), Some(old)) = (expect, &old)
        && expect.whole_file
        && expect.mark.map(|m| m.digest) != Some(hasher.hash_one(old.as_slice()))
    {
        return Ok((Outcome::LeftAlone, None));
    }
    let wanted = merge(old.as_deref())?;
    match (existing, old, wanted) {
        (None, _, None) => Ok((Outcome::Unchanged, None)),
        (Some(file), _, None) if options.in_place => {
            // A bind-mounted file cannot be removed: empty it instead.
            write_in_place(&dir, &name, &file, b"", options)?;
            Ok((Outcome::Removed, mark(file.id, b"")))
        }
        (Some(file), _, None) => {
            // The entry must still be the file checked (and, on withdrawal, ours).
            if dir.stat(&name)?.map(|s| FileId::of(&s)) != Some(file.id) {
                bail!(
                    "not removing {}: it was replaced while the agent looked at it; will look again",
                    dir.show(&name)
                );
            }
            dir.remove(&name)
                .with_context(|| format!("removing {}", dir.show(&name)))?;
            dir.sync()?;
            Ok((Outcome::Removed, None))
        }
        // A withdrawal that changes no content fixes no mode either.
        (Some(file), Some(old), Some(new))
            if old == new && (expect.is_some() || is_as_asked(&file, options)) =>
        {
            Ok((Outcome::Unchanged, mark(file.id, &new)))
        }
        (Some(file), _, Some(new)) if options.in_place => {
            write_in_place(&dir, &name, &file, &new, options)?;
            Ok((Outcome::Written, mark(file.id, &new)))
        }
        (None, _, Some(new)) if options.in_place => {
            let file = dir
                .create_new(&name, options.mode)
                .with_context(|| format!("creating {}", dir.show(&name)))?;
            let id = write_new(&dir, &name, file, &new, options)?;
            Ok((Outcome::Written, mark(id, &new)))
        }
        (_, _, Some(new)) => {
            let id = write_replacing(&dir, &name, &new, options)?;
            Ok((Outcome::Written, mark(id, &new)))
        }
    }
}

/// Mode, owner and group as the options ask.
fn is_as_asked(file: &CheckedFile, options: &FileOptions) -> bool {
    file.mode == options.mode
        && options.owner.is_none_or(|uid| file.uid == uid)
        && options.group.is_none_or(|gid| file.gid == gid)
}

/// Takes the output's lock: `LOCK_NB`, retried for at most [`LOCK_WAIT`].
fn lock(dir: &TrustedDir, name: &OsStr) -> anyhow::Result<File> {
    let lock_name = lock_name(name);
    let lock = dir.open_lock(&lock_name)?;
    let tries = (LOCK_WAIT.as_millis() / LOCK_RETRY.as_millis()).max(1);
    for attempt in 0..=tries {
        match flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(lock),
            Err(Errno::WOULDBLOCK | Errno::INTR) if attempt < tries => {
                std::thread::sleep(LOCK_RETRY)
            }
            Err(Errno::WOULDBLOCK | Errno::INTR) => break,
            Err(e) => {
                return Err(e).with_context(|| format!("locking {}", dir.show(&lock_name)));
            }
        }
    }
    let holder = rustix::fs::fstat(&lock)
        .ok()
        .and_then(|stat| lock_holder(&stat))
        .map_or_else(
            || "another process".to_owned(),
            |(pid, command)| format!("process {pid} ({command})"),
        );
    bail!(
        "the lock file {} has been held by {holder} for more than {} s: another imds-agent \
         writing the same file, or a script editing it, has not let go. The write is tried again \
         later. Fix: stop that process, or give this agent another file",
        dir.show(&lock_name),
        LOCK_WAIT.as_secs()
    )
}

/// Who holds an `flock` on the file `stat` describes, from `/proc/locks`.
fn lock_holder(stat: &rustix::fs::Stat) -> Option<(u32, String)> {
    let dev = stat.st_dev;
    let wanted = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        stat.st_ino
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid: u32 = locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        let at = fields.iter().position(|f| *f == "FLOCK")?;
        (fields.get(at + 4)? == &wanted.as_str())
            .then(|| fields.get(at + 3)?.parse().ok())
            .flatten()
    })?;
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned());
    Some((pid, command))
}

/// Gives `file` the options' mode and owner, on its descriptor.
fn set_mode_and_owner(file: &File, shown: &str, options: &FileOptions) -> anyhow::Result<()> {
    if options.owner.is_some() || options.group.is_some() {
        rustix::fs::fchown(
            file,
            options.owner.map(rustix::fs::Uid::from_raw),
            options.group.map(rustix::fs::Gid::from_raw),
        )
        .map_err(|e| crate::trust::chown_refused(e, &format!("changing the owner of {shown}")))?;
    }
    rustix::fs::fchmod(file, rustix::fs::Mode::from_raw_mode(options.mode))
        .with_context(|| format!("setting the mode of {shown}"))
}

/// Writes `bytes` to the new, empty `file` (`name` in `dir`), with the
/// options' mode and owner, and flushes it. Returns its identity.
fn write_new(
    dir: &TrustedDir,
    name: &OsStr,
    mut file: File,
    bytes: &[u8],
    options: &FileOptions,
) -> anyhow::Result<FileId> {
    let shown = dir.show(name);
    file.write_all(bytes)
        .with_context(|| format!("writing {shown}"))?;
    // Given away only once written: a temp file left by a kill before this
    // is still the agent's, and removed at the next start.
    set_mode_and_owner(&file, &shown, options)?;
    file.sync_all()
        .with_context(|| format!("flushing {shown}"))?;
    let stat = rustix::fs::fstat(&file).with_context(|| format!("examining {shown}"))?;
    Ok(FileId::of(&stat))
}

fn write_replacing(
    dir: &TrustedDir,
    name: &OsStr,
    bytes: &[u8],
    options: &FileOptions,
) -> anyhow::Result<FileId> {
    const ATTEMPTS: usize = 16;
    let mut created = None;
    for _ in 0..ATTEMPTS {
        let temp = temp_name(name, temp_suffix());
        match dir.create_new(&temp, options.mode) {
            Ok(file) => {
                created = Some((temp, file));
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", dir.show(&temp)));
            }
        }
    }
    let Some((temp, file)) = created else {
        bail!(
            "could not create a temp file beside {}: {ATTEMPTS} random names were all taken",
            dir.show(name)
        );
    };
    let result = (|| {
        let id = write_new(dir, &temp, file, bytes, options)?;
        if let Err(e) = dir.rename(&temp, name) {
            if matches!(e.raw_os_error(), Some(code) if code == Errno::BUSY.raw_os_error() || code == Errno::XDEV.raw_os_error())
            {
                bail!(
                    "cannot replace {} by renaming ({e}): it looks like a bind-mounted file. \
                     Mount its directory instead, or use the in-place mode (--in-place), \
                     which lets readers see a partial file while it is written",
                    dir.show(name)
                );
            }
            return Err(e)
                .with_context(|| format!("renaming {} to {}", dir.show(&temp), dir.show(name)));
        }
        dir.sync()?;
        Ok(id)
    })();
    if result.is_err() {
        let _ = dir.remove(&temp);
    }
    result
}

/// Rewrites the checked, open `file` in place (a bind-mounted target).
fn write_in_place(
    dir: &TrustedDir,
    name: &OsStr,
    file: &CheckedFile,
    bytes: &[u8],
    options: &FileOptions,
) -> anyhow::Result<()> {
    let shown = dir.show(name);
    set_mode_and_owner(&file.file, &shown, options)?;
    file.file
        .set_len(0)
        .with_context(|| format!("emptying {shown}"))?;
    file.file
        .write_all_at(bytes, 0)
        .with_context(|| format!("writing {shown}"))?;
    file.file
        .sync_all()
        .with_context(|| format!("flushing {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};

    fn text(s: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(Some(s.as_bytes().to_vec()))
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// Every name in `dir` that contains `.tmp.`.
    fn temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect()
    }

    #[test]
    fn writes_with_exact_mode_whatever_the_umask_and_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/file");
        let _umask = crate::trust::tests::UMASK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o000));
        let outcome = update_file(&path, &FileOptions::default(), |_| text("one")).unwrap();
        rustix::process::umask(old);
        assert_eq!(outcome, Outcome::Written);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("sub")), 0o700);
        let again = update_file(&path, &FileOptions::default(), |_| text("one")).unwrap();
        assert_eq!(again, Outcome::Unchanged);
        let group = update_file(&path, &FileOptions::group_readable(), |_| text("one")).unwrap();
        assert_eq!(group, Outcome::Written, "a wrong mode is corrected");
        assert_eq!(mode(&path), 0o640);
        assert_eq!(
            update_file(&path, &FileOptions::default(), |_| Ok(None)).unwrap(),
            Outcome::Removed
        );
        assert!(!path.exists());
    }

    #[test]
    fn writers_are_serialised_by_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "a person's edit\n").unwrap();
        // Someone else (a person's script, another agent) holds the lock.
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.path().join(".file.lock"))
            .unwrap();
        flock(&lock, FlockOperation::LockExclusive).unwrap();
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                update_file(&path, &FileOptions::default(), |old| {
                    let mut new = old.unwrap_or_default().to_vec();
                    new.extend_from_slice(b"ours\n");
                    Ok(Some(new))
                })
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!writer.is_finished(), "the writer waits for the lock");
        // The holder edits the file, then releases: the writer merges with that edit.
        fs::write(&path, "a later edit\n").unwrap();
        flock(&lock, FlockOperation::Unlock).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "a later edit\nours\n");
    }

    #[test]
    fn a_lock_held_for_ever_is_a_bounded_error_naming_the_lock_and_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "old").unwrap();
        let lock = File::create(dir.path().join(".file.lock")).unwrap();
        flock(&lock, FlockOperation::LockExclusive).unwrap();
        let err = update_file(&path, &FileOptions::default(), |_| text("new")).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains(".file.lock") && err.contains(&format!("process {}", std::process::id())),
            "expected the lock file and this test as its holder, got: {err}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
    }

    #[test]
    fn a_fifo_or_a_device_at_the_output_path_is_refused_without_blocking_or_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // A FIFO with no writer: reading it would block for ever.
        let err = update_file(&fifo, &FileOptions::default(), |_| text("x")).unwrap_err();
        assert!(format!("{err:#}").contains("a FIFO"), "{err:#}");
        let err = update_file(&fifo, &FileOptions::default(), |_| Ok(None)).unwrap_err();
        assert!(format!("{err:#}").contains("a FIFO"), "{err:#}");
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        // Our own link to /dev/zero is followed, to a device: refused, never read.
        let zero = dir.path().join("zero");
        symlink("/dev/zero", &zero).unwrap();
        let err = update_file(&zero, &FileOptions::default(), |_| {
            panic!("nothing may be merged")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("a character device"), "{err:#}");
        // A FIFO at the lock file's name does not block either.
        let path = dir.path().join("file");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join(".file.lock"),
            FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = update_file(&path, &FileOptions::default(), |_| text("x")).unwrap_err();
        assert!(format!("{err:#}").contains("lock file"), "{err:#}");
        assert!(!path.exists());
    }

    #[test]
    fn in_place_mode_rewrites_the_same_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "old").unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        let options = FileOptions {
            in_place: true,
            ..FileOptions::default()
        };
        update_file(&path, &options, |_| text("new")).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(
            fs::metadata(&path).unwrap().ino(),
            inode,
            "a bind-mounted file keeps working"
        );
        update_file(&path, &FileOptions::default(), |_| text("newer")).unwrap();
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            inode,
            "the default replaces the inode"
        );
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn in_place_mode_refuses_a_file_another_user_created() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "theirs").unwrap();
        std::os::unix::fs::chown(&path, Some(54321), None).unwrap();
        let options = FileOptions {
            in_place: true,
            ..FileOptions::default()
        };
        let err = update_file(&path, &options, |_| text("secret")).unwrap_err();
        assert!(format!("{err:#}").contains("owned by uid 54321"), "{err:#}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "theirs");
        assert_eq!(fs::metadata(&path).unwrap().uid(), 54321);
    }

    #[test]
    fn a_stale_temp_file_from_a_killed_writer_does_not_block_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        // Debris at the very name the writer tries first.
        let taken = dir.path().join(temp_name(OsStr::new("file"), 1));
        fs::write(&taken, "debris").unwrap();
        SUFFIXES.with(|s| s.borrow_mut().extend([1, 2]));
        update_file(&path, &FileOptions::default(), |_| text("new")).unwrap();
        assert!(
            SUFFIXES.with(|s| s.borrow().is_empty()),
            "the writer tried the taken name, then another"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(fs::read_to_string(&taken).unwrap(), "debris");
    }

    #[test]
    fn own_stale_temp_files_are_removed_at_start_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let output = Output::new(path.clone(), FileOptions::default()).unwrap();
        let stale = dir.path().join(".file.tmp.77.00000000deadbeef");
        let fresh = dir.path().join(".file.tmp.78.00000000deadbeef");
        let other = dir.path().join(".other.tmp.77.00000000deadbeef");
        let odd = dir.path().join(".file.tmp.77.notours");
        for p in [&stale, &fresh, &other, &odd] {
            fs::write(p, "secret").unwrap();
        }
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let old = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1_800_000_000,
                tv_nsec: 0,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1_800_000_000,
                tv_nsec: 0,
            },
        };
        for p in [&stale, &other, &odd] {
            rustix::fs::utimensat(rustix::fs::CWD, p, &old, rustix::fs::AtFlags::empty()).unwrap();
        }
        // `fresh` was modified after `started`: a writer of this run may own it.
        let newer = rustix::fs::Timestamps {
            last_access: old.last_access,
            last_modification: rustix::fs::Timespec {
                tv_sec: 2_000_000_000,
                tv_nsec: 0,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &fresh,
            &newer,
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        assert_eq!(output.remove_stale_temp_files(started).unwrap(), 1);
        assert!(!stale.exists(), "our stale temp file is removed");
        assert!(fresh.exists(), "a temp file newer than the start is kept");
        assert!(other.exists() && odd.exists(), "other names are kept");
        // No directory: nothing to do, nothing created.
        let missing = Output::new(dir.path().join("no/file"), FileOptions::default()).unwrap();
        assert_eq!(missing.remove_stale_temp_files(started).unwrap(), 0);
        assert!(!dir.path().join("no").exists());
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_strangers_look_alike_temp_file_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let output = Output::new(dir.path().join("file"), FileOptions::default()).unwrap();
        let theirs = dir.path().join(".file.tmp.77.00000000deadbeef");
        fs::write(&theirs, "theirs").unwrap();
        std::os::unix::fs::chown(&theirs, Some(54321), None).unwrap();
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        assert_eq!(output.remove_stale_temp_files(later).unwrap(), 0);
        assert!(theirs.exists());
    }

    #[test]
    fn withdrawal_removes_only_the_file_this_output_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "from before a restart").unwrap();
        let output = Output::new(path.clone(), FileOptions::default()).unwrap();
        assert_eq!(output.withdraw(|_| Ok(None)).unwrap(), Outcome::LeftAlone);
        assert_eq!(fs::read_to_string(&path).unwrap(), "from before a restart");
        output.publish(|_| text("ours")).unwrap();
        // Someone puts another file in its place.
        fs::remove_file(&path).unwrap();
        fs::write(&path, "someone else's").unwrap();
        assert_eq!(output.withdraw(|_| Ok(None)).unwrap(), Outcome::LeftAlone);
        assert_eq!(fs::read_to_string(&path).unwrap(), "someone else's");
        // The same inode with other content (edited in place, or a reused
        // inode number): not what this whole-file output wrote.
        output.publish(|_| text("ours")).unwrap();
        fs::write(&path, "edited in place").unwrap();
        assert_eq!(output.withdraw(|_| Ok(None)).unwrap(), Outcome::LeftAlone);
        assert_eq!(fs::read_to_string(&path).unwrap(), "edited in place");
        output.publish(|_| text("ours")).unwrap();
        assert_eq!(output.withdraw(|_| Ok(None)).unwrap(), Outcome::Removed);
        assert!(!path.exists());
        assert_eq!(output.withdraw(|_| Ok(None)).unwrap(), Outcome::Unchanged);

        // A shared file (one profile of a credentials file) may be edited
        // around our part: the same inode is enough.
        let shared = Output::shared(path.clone(), FileOptions::default()).unwrap();
        shared.publish(|_| text("[ours]\n")).unwrap();
        fs::write(&path, "[ours]\n[theirs]\n").unwrap();
        assert_eq!(
            shared.withdraw(|_| text("[theirs]\n")).unwrap(),
            Outcome::Written
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "[theirs]\n");
    }

    #[test]
    fn a_symlink_loop_is_a_clear_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        symlink("b", dir.path().join("a")).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        let err = update_file(&dir.path().join("a"), &FileOptions::default(), |_| {
            text("x")
        })
        .unwrap_err();
        assert!(err.to_string().contains("symlinks"), "{err:#}");
    }

    #[test]
    fn in_place_withdraw_empties_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "secret stuff").unwrap();
        let options = FileOptions {
            in_place: true,
            ..FileOptions::default()
        };
        assert_eq!(
            update_file(&path, &options, |_| Ok(None)).unwrap(),
            Outcome::Removed
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn owner_and_group_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let options = FileOptions {
            group: Some(65534),
            ..FileOptions::group_readable()
        };
        update_file(&path, &options, |_| text("x")).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.gid(), 65534);
        assert_eq!(meta.mode() & 0o777, 0o640);
        let owned = FileOptions {
            owner: Some(54321),
            ..options
        };
        assert_eq!(
            update_file(&path, &owned, |_| text("x")).unwrap(),
            Outcome::Written,
            "a wrong owner is corrected"
        );
        assert_eq!(fs::metadata(&path).unwrap().uid(), 54321);
        assert_eq!(
            update_file(&path, &owned, |_| text("x")).unwrap(),
            Outcome::Unchanged
        );
    }

    #[test]
    fn a_symlinked_target_keeps_its_link_and_the_real_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, "old").unwrap();
        let link = dir.path().join("link");
        symlink("real", &link).unwrap();
        update_file(&link, &FileOptions::default(), |old| {
            assert_eq!(old, Some(&b"old"[..]));
            text("new")
        })
        .unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&real).unwrap(), "new");
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_planted_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let shadow = dir.path().join("shadow");
        fs::write(&shadow, "root:$6$hash").unwrap();
        fs::set_permissions(&shadow, fs::Permissions::from_mode(0o600)).unwrap();
        let out = dir.path().join("out");
        crate::trust::tests::mkdir(&out, 0o755);
        std::os::unix::fs::chown(&out, Some(54321), Some(54321)).unwrap();
        let link = out.join("credentials");
        symlink(&shadow, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(54321), Some(54321)).unwrap();
        let options = FileOptions {
            owner: Some(54321),
            ..FileOptions::group_readable()
        };
        let err = update_file(&link, &options, |_| panic!("nothing may be read")).unwrap_err();
        assert!(
            format!("{err:#}").contains("refusing to follow the symlink"),
            "{err:#}"
        );
        let output = Output::new(link.clone(), options).unwrap();
        let err = output.withdraw(|_| Ok(None)).unwrap_err();
        assert!(
            format!("{err:#}").contains("refusing to follow the symlink"),
            "{err:#}"
        );
        let meta = fs::metadata(&shadow).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (0, 0o600),
            "owner and mode of the target"
        );
        assert_eq!(fs::read_to_string(&shadow).unwrap(), "root:$6$hash");
        assert!(fs::symlink_metadata(&link).is_ok(), "the link is left");
    }

    #[test]
    fn a_group_or_other_writable_mode_is_refused() {
        for mode in [0o660, 0o620, 0o602, 0o604, 0o4600] {
            let options = FileOptions {
                mode,
                ..FileOptions::default()
            };
            let err = Output::new(PathBuf::from("x"), options).unwrap_err();
            assert!(
                format!("{err:#}").contains("use 0600 or 0640"),
                "{mode:o}: {err:#}"
            );
        }
        FileOptions::group_readable().check().unwrap();
    }

    #[test]
    #[cfg_attr(
        not(as_root),
        ignore = "needs root: chattr +i (run the suite as root, as CI does)"
    )]
    fn a_failed_write_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        crate::trust::tests::mkdir(&out, 0o755);
        let path = out.join("file");
        update_file(&path, &FileOptions::default(), |_| text("old")).unwrap();
        // An immutable directory refuses new files even to root: the write
        // fails the way a read-only or full file system would make it fail.
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(&out)
                .status()
        };
        assert!(
            chattr("+i").is_ok_and(|s| s.success()),
            "expected chattr +i to work on the temp dir's file system (root, ext4 or tmpfs)"
        );
        let result = update_file(&path, &FileOptions::default(), |_| text("new"));
        assert!(chattr("-i").unwrap().success());
        let err = result.unwrap_err();
        assert!(format!("{err:#}").contains(".file.tmp"), "{err:#}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        let leftovers = temp_files(&out);
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        // Once the fault clears, the next write succeeds.
        update_file(&path, &FileOptions::default(), |_| text("new")).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
    #[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
    fn a_bind_mounted_target_gets_a_clear_error_and_in_place_mode_works() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("host-file");
        let target = dir.path().join("credentials");
        fs::write(&source, "old").unwrap();
        fs::write(&target, "").unwrap();
        let mounted = std::process::Command::new("mount")
            .arg("--bind")
            .arg(&source)
            .arg(&target)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount --bind as root");
        let unmount = || {
            let _ = std::process::Command::new("umount").arg(&target).status();
        };
        let replaced = update_file(&target, &FileOptions::default(), |_| text("new"));
        let in_place = FileOptions {
            in_place: true,
            ..FileOptions::default()
        };
        let written = update_file(&target, &in_place, |_| text("new"));
        unmount();
        let err = format!("{:#}", replaced.unwrap_err());
        assert!(
            err.contains("bind-mounted") && err.contains("--in-place"),
            "{err}"
        );
        written.unwrap();
        assert_eq!(fs::read_to_string(&source).unwrap(), "new");
        assert!(temp_files(dir.path()).is_empty());
    }
}
