//! tlsgate's TLS terminator.
#![deny(unsafe_code)]

pub mod uring;
