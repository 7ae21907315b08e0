//! The tlsgate process.
#![forbid(unsafe_code)]
