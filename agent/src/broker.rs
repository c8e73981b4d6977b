//! The credential broker: per-consumer role sessions obtained from STS with
//! the instance role's credentials.

pub mod sts;
