//! Replacing a file so that no reader ever sees a partial or mixed file.
//!
//! The new content goes to a temporary file in the same directory, created
//! exclusively, never through a symlink, with its final mode (set again with
//! `fchmod`, so the umask cannot widen or narrow it) and owner; it is written,
//! `fsync`ed, renamed over the target, and the directory is `fsync`ed. A
//! reader opens either the old inode or the new one, never a half-written
//! file. Writers (two agents, or an agent and a person's script) are
//! serialised by an `flock` on a sibling `.NAME.lock` file, and the target is
//! read under that lock, just before merging, so no concurrent edit is lost.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rustix::fs::{FlockOperation, OFlags, flock};

/// Mode and ownership of an output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Permission bits, exactly (default 0600).
    pub mode: u32,
    /// New owner uid, if the agent may change it (needs CAP_CHOWN).
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
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The content was already right: nothing was written.
    Unchanged,
    /// The file was replaced.
    Written,
    /// The file was removed.
    Removed,
}

/// Follows a symlinked target to the real file, so the link stays intact and
/// the file it names is replaced.
fn real_target(path: &Path) -> anyhow::Result<PathBuf> {
    const MAX_LINKS: usize = 40;
    let mut current = path.to_owned();
    for _ in 0..MAX_LINKS {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&current)
                    .with_context(|| format!("reading the link {}", current.display()))?;
                current = if target.is_absolute() {
                    target
                } else {
                    current.parent().unwrap_or(Path::new(".")).join(target)
                };
            }
            _ => return Ok(current),
        }
    }
    bail!(
        "{} is a chain of more than {MAX_LINKS} symlinks (a loop?)",
        path.display()
    )
}

/// Reads the target under the lock, asks `merge` for the new content (`None`:
/// remove the file) and writes it atomically when it differs.
pub fn update_file(
    path: &Path,
    options: &FileOptions,
    merge: impl FnOnce(Option<&str>) -> anyhow::Result<Option<String>>,
) -> anyhow::Result<Outcome> {
    let path = real_target(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_string_lossy()
        .into_owned();
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating the directory {}", dir.display()))?;
    }
    let lock_path = dir.join(format!(".{name}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
        .open(&lock_path)
        .with_context(|| format!("opening the lock file {}", lock_path.display()))?;
    flock(&lock, FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", lock_path.display()))?;

    let existing = match File::open(&path) {
        Ok(mut file) => {
            let mut text = String::new();
            file.read_to_string(&mut text)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(text)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let wanted = merge(existing.as_deref())?;
    match (existing, wanted) {
        (None, None) => Ok(Outcome::Unchanged),
        (Some(_), None) if options.in_place => {
            // A bind-mounted file cannot be removed: empty it instead.
            write_in_place(&path, b"", options)?;
            Ok(Outcome::Removed)
        }
        (Some(_), None) => {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            sync_dir(&dir)?;
            Ok(Outcome::Removed)
        }
        (Some(old), Some(new)) if old == new && mode_is(&path, options) => Ok(Outcome::Unchanged),
        (_, Some(new)) => {
            if options.in_place {
                write_in_place(&path, new.as_bytes(), options)?;
            } else {
                write_replacing(&dir, &name, &path, new.as_bytes(), options)?;
            }
            Ok(Outcome::Written)
        }
    }
}

fn mode_is(path: &Path, options: &FileOptions) -> bool {
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == options.mode)
}

fn set_mode_and_owner(file: &File, path: &Path, options: &FileOptions) -> anyhow::Result<()> {
    if options.owner.is_some() || options.group.is_some() {
        std::os::unix::fs::fchown(file, options.owner, options.group)
            .with_context(|| format!("changing the owner of {}", path.display()))?;
    }
    file.set_permissions(Permissions::from_mode(options.mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn write_replacing(
    dir: &Path,
    name: &str,
    path: &Path,
    bytes: &[u8],
    options: &FileOptions,
) -> anyhow::Result<()> {
    // A random suffix: a temp file left by a killed agent (whose pid a
    // restarted agent may reuse, e.g. as PID 1 in a container) never blocks us.
    let temp = dir.join(format!(
        ".{name}.tmp.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(options.mode)
            .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
            .open(&temp)
            .with_context(|| format!("creating {}", temp.display()))?;
        set_mode_and_owner(&file, &temp, options)?;
        file.write_all(bytes)
            .with_context(|| format!("writing {}", temp.display()))?;
        file.sync_all()
            .with_context(|| format!("flushing {}", temp.display()))?;
        if let Err(e) = fs::rename(&temp, path) {
            if matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::BUSY.raw_os_error() || code == rustix::io::Errno::XDEV.raw_os_error())
            {
                bail!(
                    "cannot replace {} by renaming ({e}): it looks like a bind-mounted file. \
                     Mount its directory instead, or use the in-place mode (--in-place), \
                     which lets readers see a partial file while it is written",
                    path.display()
                );
            }
            return Err(e)
                .with_context(|| format!("renaming {} to {}", temp.display(), path.display()));
        }
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_in_place(path: &Path, bytes: &[u8], options: &FileOptions) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(options.mode)
        .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    set_mode_and_owner(&file, path, options)?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("flushing {}", path.display()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing the directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn writes_with_exact_mode_whatever_the_umask_and_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/file");
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o000));
        let outcome =
            update_file(&path, &FileOptions::default(), |_| Ok(Some("one".into()))).unwrap();
        rustix::process::umask(old);
        assert_eq!(outcome, Outcome::Written);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(dir.path().join("sub"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let again =
            update_file(&path, &FileOptions::default(), |_| Ok(Some("one".into()))).unwrap();
        assert_eq!(again, Outcome::Unchanged);
        let group = update_file(&path, &FileOptions::group_readable(), |_| {
            Ok(Some("one".into()))
        })
        .unwrap();
        assert_eq!(group, Outcome::Written, "a wrong mode is corrected");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
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
                    Ok(Some(format!("{}ours\n", old.unwrap_or(""))))
                })
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!writer.is_finished(), "the writer waits for the lock");
        // The holder edits the file, then releases: the writer merges with that edit.
        fs::write(&path, "a later edit\n").unwrap();
        flock(&lock, FlockOperation::Unlock).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "a later edit\nours\n");
    }

    #[test]
    fn in_place_mode_rewrites_the_same_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "old").unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        let options = FileOptions {
            in_place: true,
            ..FileOptions::default()
        };
        update_file(&path, &options, |_| Ok(Some("new".into()))).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(
            fs::metadata(&path).unwrap().ino(),
            inode,
            "a bind-mounted file keeps working"
        );
        update_file(&path, &FileOptions::default(), |_| Ok(Some("newer".into()))).unwrap();
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            inode,
            "the default replaces the inode"
        );
    }

    #[test]
    fn a_stale_temp_file_from_a_killed_writer_does_not_block_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(
            dir.path().join(format!(".file.tmp.{}", std::process::id())),
            "debris",
        )
        .unwrap();
        update_file(&path, &FileOptions::default(), |_| Ok(Some("new".into()))).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
    fn a_symlink_loop_is_a_clear_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        symlink("b", dir.path().join("a")).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        let err = update_file(&dir.path().join("a"), &FileOptions::default(), |_| {
            Ok(Some("x".into()))
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
    fn owner_and_group_are_applied() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: changing a file's group to an arbitrary gid needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let options = FileOptions {
            group: Some(65534),
            ..FileOptions::group_readable()
        };
        update_file(&path, &options, |_| Ok(Some("x".into()))).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.gid(), 65534);
        assert_eq!(meta.mode() & 0o777, 0o640);
    }

    #[test]
    fn a_symlinked_target_keeps_its_link_and_the_real_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, "old").unwrap();
        let link = dir.path().join("link");
        symlink("real", &link).unwrap();
        update_file(&link, &FileOptions::default(), |old| {
            assert_eq!(old, Some("old"));
            Ok(Some("new".into()))
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
    fn a_failed_write_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let path = out.join("file");
        update_file(&path, &FileOptions::default(), |_| Ok(Some("old".into()))).unwrap();
        // An immutable directory refuses new files even to root: the write
        // fails the way a read-only or full file system would make it fail.
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(&out)
                .status()
        };
        if !chattr("+i").is_ok_and(|s| s.success()) {
            eprintln!("skipped: chattr +i is not available on this file system");
            return;
        }
        let result = update_file(&path, &FileOptions::default(), |_| Ok(Some("new".into())));
        assert!(chattr("-i").unwrap().success());
        let err = result.unwrap_err();
        assert!(format!("{err:#}").contains(".file.tmp"), "{err:#}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        let leftovers: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        // Once the fault clears, the next write succeeds.
        update_file(&path, &FileOptions::default(), |_| Ok(Some("new".into()))).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
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
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: bind mounts need root");
            return;
        }
        let unmount = || {
            let _ = std::process::Command::new("umount").arg(&target).status();
        };
        let replaced = update_file(&target, &FileOptions::default(), |_| Ok(Some("new".into())));
        let in_place = FileOptions {
            in_place: true,
            ..FileOptions::default()
        };
        let written = update_file(&target, &in_place, |_| Ok(Some("new".into())));
        unmount();
        let err = format!("{:#}", replaced.unwrap_err());
        assert!(
            err.contains("bind-mounted") && err.contains("--in-place"),
            "{err}"
        );
        written.unwrap();
        assert_eq!(fs::read_to_string(&source).unwrap(), "new");
    }
}
