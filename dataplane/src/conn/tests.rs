//! In-memory tests of the connection core: a real rustls client talks to a [`Conn`] through byte
//! vectors, the test plays driver (reads only when the core asks, runs key operations when it
//! says so, moves the clock by hand) and asserts on the bytes and events that come out. No
//! sockets, no threads, no sleeps.
//!
//! [`Conn`]: super::Conn

mod backend;
mod backend_key_ops;
mod handshake;
mod harness;
mod hello_retry;
mod key_ops;
mod proxying;
