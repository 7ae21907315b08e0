//! Shared harness for tlsgate's hardware and end-to-end tests.
//!
//! - [`softhsm`]: a fresh SoftHSM2 token per test, deleted when the test ends.
//! - [`backend`]: the same test body against every key backend (software, SoftHSM2, and an
//!   external PKCS#11 module named by `TLSGATE_TEST_PKCS11_MODULE`).
//! - [`ca`]: a lab CA in a temporary directory, issuing chains for test keys.
//! - [`tls`]: in-memory rustls handshakes.
//! - [`skip`]: the one rule for a missing component (fails under `CI=true`, skips elsewhere).
#![forbid(unsafe_code)]

pub mod backend;
pub mod ca;
pub mod skip;
pub mod softhsm;
pub mod tls;
pub mod verify;

pub use backend::{backends, Backend, TestKey};
pub use ca::TestCa;
pub use softhsm::TestToken;
