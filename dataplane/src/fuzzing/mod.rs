//! Fuzz entry points for the data plane's parsers of untrusted bytes (the `fuzz/` crate's
//! targets call these; `replay` tests run their corpora on stable).
//!
//! Compiled only for tests and under `--cfg fuzzing` (which `cargo fuzz` sets): the fixture key
//! below is a throwaway test key and never part of a product build. Every function takes
//! arbitrary bytes, must not panic, and asserts an invariant a bug would break.

mod conn_core;
#[cfg(test)]
mod harness;
mod input;
mod proxy;
#[cfg(test)]
mod replay;

pub use conn_core::conn_core;
pub use proxy::proxy_v2_round_trip;

use rustls::server::{Acceptor, ServerSessionMemoryCache, StoresServerSessions};

use crate::keyops::hint as hello;

/// The ClientHello peek behind the key-op offload decision (`keyops::hint`), checked against
/// rustls's own parser: a hello rustls accepts must be readable by the hint parser too (else
/// every such handshake pays an inline attempt it did not need), and a session id it reads
/// must make a resumption likely once the store knows it.
pub fn client_hello(data: &[u8]) {
    let empty = ServerSessionMemoryCache::new(4);
    let hint = hello::scan(data);
    let may = hello::may_resume(data, &*empty);
    if hint.is_none() {
        assert!(may, "unreadable bytes must take the safe path");
    }
    if let Some(h) = &hint {
        assert!(
            h.session_id.len() <= 255,
            "a session id is at most 255 bytes"
        );
        assert_eq!(may, h.psk || h.ticket, "an empty store knows no session id");
    }

    let mut acceptor = Acceptor::default();
    let mut rd = data;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if let Ok(Some(_accepted)) = acceptor.accept() {
        let h = hint.unwrap_or_else(|| {
            panic!("rustls accepted this ClientHello but the hint parser could not read it")
        });
        if !h.session_id.is_empty() {
            let store = ServerSessionMemoryCache::new(4);
            assert!(store.put(h.session_id.clone(), b"state".to_vec()));
            assert!(
                hello::may_resume(data, &*store),
                "a session id the store knows may resume"
            );
        }
    }
}
