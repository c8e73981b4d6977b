//! The host's credential broker: each local consumer gets credentials scoped
//! to what it needs.
//!
//! Without a config file every allowed peer gets the instance role's
//! credentials. With one ([`config`]), each peer is mapped to a *consumer*,
//! and the agent hands it a session of its own: STS `AssumeRole`, signed with
//! the instance role's credentials, for the consumer's role (or the instance
//! role itself) narrowed by its session policies. [`cache`] keeps one such
//! session per consumer with the same guarantees as the instance credentials
//! (refresh windows with jitter, single flight, static stability), and
//! follows the instance role: a detach withdraws every session, a replacement
//! re-assumes, a rotation changes nothing.
//!
//! Sinks never call STS: only the broker does, through the [`cache::AssumeRole`]
//! trait, which [`assumer::StsAssumer`] implements over the STS client.

pub mod assumer;
pub mod cache;
pub mod config;
pub mod files;
pub mod handout;
pub mod sts;
pub mod tokens;
