//! A string that never shows itself.
//!
//! Anyone who reads a secret access key, a session token or an IMDS token can
//! act as the role, so these values are wrapped in [`SecretString`]: its
//! `Debug` prints `** redacted **`, it has no `Display`, and its memory is
//! zeroed on drop. Reading the value is an explicit `expose()`.

use std::fmt;
use zeroize::Zeroizing;

/// A secret string: redacted in `Debug`, zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret value. Every call site is a place a secret leaves its box.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("** redacted **")
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = SecretString::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
        let shown = format!("{secret:?} {:#?}", secret);
        assert!(!shown.contains("wJalr"), "{shown}");
        assert!(shown.contains("redacted"));
        assert_eq!(secret.expose(), "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
    }
}
