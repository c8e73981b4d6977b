//! The container endpoint's token file: whoever knows the token gets the
//! role's credentials, so the file must be the agent's own.
//!
//! A token file another user made (a symlink to a file of theirs, a file
//! they own, a file every user may read, a token short enough to guess) would
//! hand them the credentials. So the file is reached through its checked
//! directory ([`crate::trust`]), never through a symlink, and accepted only
//! when it is a regular file owned by root or the agent's user, with no
//! permission for other users, holding [`MIN_TOKEN_LEN`] to [`MAX_TOKEN_LEN`]
//! visible ASCII characters and no trailing newline (AWS SDKs send the file's
//! exact content as the `Authorization` header). Otherwise the agent refuses
//! to start, naming the fix. A missing file is created exclusively with a
//! fresh random token.

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use imds_client::SecretString;

use crate::trust::{self, Trust, TrustedDir};

/// The shortest token accepted: 32 bytes, too many to guess.
pub const MIN_TOKEN_LEN: usize = 32;

/// The longest token accepted (an HTTP header value; ours is 64).
pub const MAX_TOKEN_LEN: usize = 4096;

/// The mode of a generated token file: the agent's user writes it, its group
/// (the consumers, with `chgrp`) reads it, nobody else.
const NEW_TOKEN_MODE: u32 = 0o640;

/// A token read from its file, with what the file looked like (for `doctor`).
#[derive(Debug)]
pub struct TokenFile {
    /// The token.
    pub token: SecretString,
    /// The file's permission bits.
    pub mode: u32,
    /// The file's owner.
    pub uid: u32,
}

/// Reads the token from `path`, or, when the file does not exist, generates
/// 32 random bytes (64 hex characters) and writes them there (mode 0640,
/// created exclusively, never through a symlink, no trailing newline).
pub fn load_or_create(path: &Path) -> anyhow::Result<SecretString> {
    let trust = Trust::agent();
    let (dir, name) = open_dir(path, &trust)?;
    if let Some(file) = read_in(&dir, name, path)? {
        return Ok(file.token);
    }
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = dir.create_new(name, NEW_TOKEN_MODE).with_context(|| {
        format!(
            "creating the container token file {} (if it exists now, someone created it while the agent started: remove it)",
            path.display()
        )
    })?;
    file.write_all(token.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing the container token file {}", path.display()))?;
    Ok(SecretString::new(token))
}

/// Reads and checks the token file at `path` (see the module docs);
/// `Ok(None)` when it does not exist. `trust` says whose files are accepted.
pub fn read(path: &Path, trust: &Trust) -> anyhow::Result<Option<TokenFile>> {
    let (dir, name) = open_dir(path, trust)?;
    read_in(&dir, name, path)
}

fn open_dir<'a>(path: &'a Path, trust: &Trust) -> anyhow::Result<(TrustedDir, &'a OsStr)> {
    let Some(name) = path.file_name() else {
        bail!(
            "--container-token-file {}: give the path of a file, such as /run/imds-agent/container-token",
            path.display()
        );
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = trust::open_dir(parent, trust)
        .with_context(|| format!("the container token file {}", path.display()))?;
    Ok((dir, name))
}

fn read_in(dir: &TrustedDir, name: &OsStr, path: &Path) -> anyhow::Result<Option<TokenFile>> {
    let shown = path.display();
    let Some(mut file) = dir
        .open_file(name, false)
        .with_context(|| format!("the container token file {shown}"))?
    else {
        return Ok(None);
    };
    if file.mode & 0o007 != 0 {
        bail!(
            "refusing the container token file {shown}: its mode {:04o} lets every user read it, \
             and whoever knows the token gets the credentials. Fix: `chmod o-rwx {shown}` and \
             replace the token (it may be known), or remove the file and the agent writes a new one",
            file.mode
        );
    }
    let mut bytes = file.read_all(path)?;
    if let Err(why) = check_token(&bytes) {
        bytes.fill(0);
        bail!(
            "refusing the container token file {shown}: {why}. Fix: remove it, and the agent writes \
             a random 64-character token there (mode 0640)"
        );
    }
    let token = String::from_utf8(bytes).expect("checked: visible ASCII");
    Ok(Some(TokenFile {
        token: SecretString::new(token),
        mode: file.mode,
        uid: file.uid,
    }))
}

/// Why `token` is no good, if it is not.
fn check_token(token: &[u8]) -> Result<(), String> {
    if matches!(token.last(), Some(b'\n' | b'\r')) {
        return Err(
            "it ends with a newline, which AWS SDKs would send as part of the token".into(),
        );
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "it holds {} bytes, fewer than {MIN_TOKEN_LEN}: a short token can be guessed",
            token.len()
        ));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "it holds {} bytes, more than {MAX_TOKEN_LEN}",
            token.len()
        ));
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(
            "it holds a space, a control character or a non-ASCII byte; AWS SDKs send the token as an HTTP header".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A directory with an exact mode, whatever umask a concurrent test set
    /// (the trust rules refuse one others could write).
    fn test_dir(tmp: &tempfile::TempDir) -> std::path::PathBuf {
        let dir = tmp.path().join("d");
        crate::trust::tests::mkdir(&dir, 0o755);
        dir
    }

    fn write(path: &Path, content: &str, mode: u32) {
        std::fs::write(path, content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_missing_token_is_generated_once_and_then_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = test_dir(&tmp);
        let path = dir.join("token");
        let token = load_or_create(&path).unwrap();
        assert_eq!(token.expose().len(), 64);
        assert!(token.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(load_or_create(&path).unwrap(), token);
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason_and_never_shown() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = test_dir(&tmp);
        let path = dir.join("token");
        let good = "0123456789abcdef0123456789abcdef";
        for (content, mode, why) in [
            (format!("{good}\n"), 0o600, "ends with a newline"),
            ("short-secret-token".to_owned(), 0o600, "fewer than 32"),
            (format!("{good} {good}"), 0o600, "a space"),
            ("x".repeat(MAX_TOKEN_LEN + 1), 0o600, "more than 4096"),
            (good.to_owned(), 0o644, "lets every user read it"),
        ] {
            write(&path, &content, mode);
            let err = format!("{:#}", load_or_create(&path).unwrap_err());
            assert!(err.contains(why), "expected {why:?} in: {err}");
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains("Fix:"), "{err}");
            assert!(!err.contains("0123456789abcdef"), "the token leaked: {err}");
        }
        write(&path, good, 0o640);
        assert_eq!(load_or_create(&path).unwrap().expose(), good);
    }

    #[test]
    fn a_symlinked_token_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = test_dir(&tmp);
        let real = dir.join("real");
        write(&real, "0123456789abcdef0123456789abcdef", 0o600);
        let path = dir.join("token");
        std::os::unix::fs::symlink(&real, &path).unwrap();
        let err = format!("{:#}", load_or_create(&path).unwrap_err());
        assert!(err.contains("a symlink"), "{err}");
    }
}
