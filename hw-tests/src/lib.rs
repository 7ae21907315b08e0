//! Shared harness for tlsgate's hardware and end-to-end tests.
#![forbid(unsafe_code)]
