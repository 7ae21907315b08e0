//! TLS to the backend: the core is a TLS client there; its handshake is bounded by the backend
//! connect timeout and its failures end the client's session.

use std::io::{Read, Write};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::server::ServerConnection;

use super::harness::{pki, prepare, snapshot, Ending, Link, Pki, TLS13};
use crate::config::Limits;
use crate::conn::{BackendTls, BackendTlsCause, CloseReason};

const BACKEND_NAME: &str = "backend.test";

/// A listener whose backend speaks TLS, trusting `backend_ca` for `backend.test`.
fn tls_backend_link(backend_ca: &Pki, proxy_protocol: bool) -> Link {
    let mut snap = snapshot(pki().server_config());
    snap.proxy_protocol = proxy_protocol;
    snap.backend_tls = Some(BackendTls {
        config: backend_ca.client_config(TLS13),
        server_name: ServerName::try_from(BACKEND_NAME).expect("literal"),
        offload_key_ops: false,
    });
    Link::established_with(prepare(snap), &Limits::default(), TLS13)
}

/// Moves records between the core's backend side and an in-memory TLS backend until quiet.
fn shuttle(l: &mut Link, backend: &mut ServerConnection) {
    loop {
        let mut moved = false;
        let to_backend = l.backend_take();
        if !to_backend.is_empty() {
            let mut rd = &to_backend[..];
            while !rd.is_empty() {
                backend.read_tls(&mut rd).expect("backend reads records");
            }
            backend
                .process_new_packets()
                .expect("backend accepts the core's records");
            moved = true;
        }
        let mut from_backend = Vec::new();
        while backend.wants_write() {
            backend
                .write_tls(&mut from_backend)
                .expect("writing to a Vec cannot fail");
        }
        if !from_backend.is_empty() {
            l.backend_send(&from_backend);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn backend_server(p: &Pki) -> ServerConnection {
    ServerConnection::new(p.server_config()).expect("backend server")
}

#[test]
fn backend_tls_carries_bytes_both_ways_encrypted() {
    let backend_pki = Pki::new(BACKEND_NAME);
    let mut l = tls_backend_link(&backend_pki, false);
    let mut backend = backend_server(&backend_pki);
    // Sent before the backend handshake finished: it waits, then goes encrypted.
    l.client_send(b"secret request");
    let hello = l.conn.backend_out().to_vec();
    assert_eq!(hello[0], 0x16, "the backend gets a ClientHello first");
    shuttle(&mut l, &mut backend);
    let mut got = vec![0u8; 64];
    let n = backend
        .reader()
        .read(&mut got)
        .expect("plaintext at the backend");
    assert_eq!(&got[..n], b"secret request");
    assert!(
        !hello.windows(14).any(|w| w == b"secret request"),
        "nothing in clear while the backend handshake runs"
    );

    // The client finishes: the backend gets close_notify, then the socket's write side shuts.
    l.client_close_notify();
    assert!(!l.conn.wants_backend_shutdown(), "close_notify goes first");
    shuttle(&mut l, &mut backend);
    assert_eq!(
        backend.reader().read(&mut got).expect("end of stream"),
        0,
        "close_notify reached the backend"
    );
    assert!(l.conn.wants_backend_shutdown());
    l.conn.backend_write_shut();

    backend
        .writer()
        .write_all(b"secret answer")
        .expect("backend plaintext");
    backend.send_close_notify();
    shuttle(&mut l, &mut backend);
    assert_eq!(
        l.client_recv(),
        (b"secret answer".to_vec(), Ending::CloseNotify),
        "backend close_notify becomes ours"
    );
    assert_eq!(l.conn.closed(), None);
}

#[test]
fn proxy_header_goes_in_clear_before_the_backend_client_hello() {
    let backend_pki = Pki::new(BACKEND_NAME);
    let l = tls_backend_link(&backend_pki, true);
    let out = l.conn.backend_out();
    assert_eq!(&out[..12], b"\r\n\r\n\0\r\nQUIT\n");
    let len = usize::from(u16::from_be_bytes([out[14], out[15]]));
    assert_eq!(out[16 + len], 0x16, "TLS starts right after the header");
}

#[test]
fn backend_tls_handshake_is_bounded_by_the_connect_timeout() {
    let limits = Limits::default();
    let backend_pki = Pki::new(BACKEND_NAME);
    let mut l = tls_backend_link(&backend_pki, false);
    l.advance(Duration::from_millis(5));
    let _hello = l.backend_take();
    // The backend accepted the TCP connection and says nothing.
    let due = l.t0 + limits.backend_connect_timeout();
    assert_eq!(l.conn.deadline(), due);
    l.conn.on_timer(due - Duration::from_millis(1));
    assert_eq!(l.conn.closed(), None);
    l.conn.on_timer(due);
    assert_eq!(
        l.conn.closed(),
        Some(CloseReason::BackendTlsError(
            BackendTlsCause::HandshakeTimeout
        ))
    );
    l.pump();
    assert_eq!(
        l.client_recv(),
        (Vec::new(), Ending::CloseNotify),
        "the client learns the backend is gone, not why"
    );
}

#[test]
fn backend_closing_during_its_handshake_is_a_backend_tls_error() {
    let backend_pki = Pki::new(BACKEND_NAME);
    let mut l = tls_backend_link(&backend_pki, false);
    let _hello = l.backend_take();
    l.backend_eof();
    assert_eq!(
        l.conn.closed(),
        Some(CloseReason::BackendTlsError(
            BackendTlsCause::ClosedDuringHandshake
        ))
    );
}

#[test]
fn backend_certificate_for_another_name_is_refused() {
    let backend_ca = Pki::new("someone-else.test");
    let mut l = tls_backend_link(&backend_ca, false);
    l.client_send(b"must not leak");
    let mut backend = backend_server(&backend_ca);
    let hello = l.backend_take();
    backend
        .read_tls(&mut &hello[..])
        .expect("backend reads the hello");
    backend.process_new_packets().expect("backend hello");
    let mut flight = Vec::new();
    while backend.wants_write() {
        backend.write_tls(&mut flight).expect("Vec write");
    }
    l.backend_send(&flight);
    assert_eq!(
        l.conn.closed(),
        Some(CloseReason::BackendTlsError(BackendTlsCause::NameMismatch))
    );
    assert_eq!(
        l.conn.backend_out(),
        b"",
        "no byte (and so no plaintext) toward an unverified backend"
    );
}
