//! Which consumer a container is: the token it presents.
//!
//! The container-credentials endpoint cannot tell consumers apart by uid (a
//! container on a bridge has no local uid, and a loopback TCP peer's is only
//! a hint), so each consumer with a
//! `container_token_file` is told apart by its token: a container presenting
//! that file's content as `Authorization` gets that consumer's credentials.
//!
//! A presented token is compared with **every** consumer's token, each in
//! constant time ([`subtle`]), and the comparisons are combined without
//! stopping at a match: how long the answer takes does not tell an attacker
//! how much of a token it guessed, nor which consumer's. Two consumers whose
//! files hold the same token are refused at load: a container presenting it
//! would be both.

use std::fmt;
use std::path::Path;

use anyhow::{Context, bail};
use imds_client::SecretString;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use super::config::Config;
use crate::token_file;

/// Each consumer's container token (secrets redacted in `Debug`).
#[derive(Default)]
pub struct ConsumerTokens {
    entries: Vec<(String, SecretString)>,
}

impl fmt::Debug for ConsumerTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ConsumerTokens")
            .field("consumers", &names)
            .finish_non_exhaustive()
    }
}

impl ConsumerTokens {
    /// Reads (or, when missing, generates) the token file of every consumer
    /// that has a `container_token_file`, by the rules of [`token_file`].
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let mut tokens = Self::default();
        for consumer in config.consumers() {
            let Some(path) = &consumer.container_token_file else {
                continue;
            };
            let token = token_file::load_or_create(path)
                .with_context(|| format!("the container token of consumer {:?}", consumer.name))?;
            tokens.insert(&consumer.name, token, path)?;
        }
        Ok(tokens)
    }

    /// Adds `consumer`'s token (read from `path`, named in errors). Refuses a
    /// token another consumer has already.
    pub fn insert(
        &mut self,
        consumer: &str,
        token: SecretString,
        path: &Path,
    ) -> anyhow::Result<()> {
        if let Some(other) = self.consumer_for(token.expose().as_bytes()) {
            bail!(
                "the container token in {} (consumer {consumer:?}) is the same as consumer \
                 {other:?}'s, so a container presenting it would be both. Fix: remove {} \
                 and restart the agent (it generates a new token)",
                path.display(),
                path.display()
            );
        }
        self.entries.push((consumer.to_owned(), token));
        Ok(())
    }

    /// The consumer whose token `presented` is; `None` when none is.
    pub fn consumer_for(&self, presented: &[u8]) -> Option<&str> {
        let mut found = Choice::from(0);
        let mut index = 0u64;
        for (i, (_, token)) in self.entries.iter().enumerate() {
            let equal = presented.ct_eq(token.expose().as_bytes());
            index.conditional_assign(&(i as u64), equal);
            found |= equal;
        }
        bool::from(found).then(|| self.entries[index as usize].0.as_str())
    }

    /// How many consumers have a token.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no consumer has a token.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BILLING: &str = "b1111111111111111111111111111111111111111111111111111111111111111";
    const WEB: &str = "w2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn each_token_maps_to_its_consumer_and_nothing_else_matches() {
        let mut tokens = ConsumerTokens::default();
        tokens
            .insert(
                "billing",
                SecretString::new(BILLING),
                Path::new("/t/billing"),
            )
            .expect("insert");
        tokens
            .insert("web", SecretString::new(WEB), Path::new("/t/web"))
            .expect("insert");
        assert_eq!(tokens.consumer_for(BILLING.as_bytes()), Some("billing"));
        assert_eq!(tokens.consumer_for(WEB.as_bytes()), Some("web"));
        assert_eq!(
            tokens.consumer_for(&BILLING.as_bytes()[..40]),
            None,
            "a prefix"
        );
        assert_eq!(tokens.consumer_for(b""), None);
        assert_eq!(tokens.consumer_for(format!("{WEB}x").as_bytes()), None);
        let shown = format!("{tokens:?}");
        assert!(!shown.contains(BILLING) && !shown.contains(WEB), "{shown}");
    }

    #[test]
    fn two_consumers_with_one_token_are_refused() {
        let mut tokens = ConsumerTokens::default();
        tokens
            .insert(
                "billing",
                SecretString::new(BILLING),
                Path::new("/t/billing"),
            )
            .expect("insert");
        let error = tokens
            .insert("web", SecretString::new(BILLING), Path::new("/t/web"))
            .expect_err("same token");
        let shown = format!("{error:#}");
        assert!(
            shown.starts_with(
                "the container token in /t/web (consumer \"web\") is the same as consumer \"billing\"'s"
            ),
            "{shown}"
        );
        assert!(
            !shown.contains(BILLING),
            "the token is never shown: {shown}"
        );
    }

    #[test]
    fn load_generates_one_token_file_per_consumer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "[[consumer]]\nname = \"a\"\ncontainer_token_file = \"{0}/a\"\n\
             [[consumer]]\nname = \"b\"\ncontainer_token_file = \"{0}/b\"\n\
             [[consumer]]\nname = \"c\"\n",
            dir.path().display()
        );
        let config = Config::parse(&text, Path::new("/etc/imds-agent/agent.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let tokens = ConsumerTokens::load(&config).expect("load");
        assert_eq!(tokens.len(), 2);
        for name in ["a", "b"] {
            let token = std::fs::read(dir.path().join(name)).expect("generated token file");
            assert_eq!(tokens.consumer_for(&token), Some(name));
        }
        // Read back, not regenerated.
        let again = ConsumerTokens::load(&config).expect("load again");
        let token = std::fs::read(dir.path().join("a")).expect("token");
        assert_eq!(again.consumer_for(&token), Some("a"));
    }
}
