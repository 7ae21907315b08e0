//! Keys and certificates for tlsgate.
#![forbid(unsafe_code)]
