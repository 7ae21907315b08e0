//! Client handshakes signed inline, and ClientHellos the core must refuse.

use std::time::Duration;

use super::harness::{
    inline_listener, offload_listener, pki, prepare, snapshot, Link, TLS12, TLS13,
};
use crate::config::Limits;
use crate::conn::{CloseReason, ALERT_UNRECOGNIZED_NAME};
use crate::snapshot::SniFilter;

/// Handshake with inline signing, then bytes both ways; the backend sees nothing before it is
/// connected.
fn inline_round_trip(versions: &[&'static rustls::SupportedProtocolVersion], version: &str) {
    let mut l = Link::new(
        inline_listener(),
        &Limits::default(),
        pki().client_config(versions),
    );
    assert!(l.conn.wants_client_read());
    l.pump();
    assert!(l.jobs.is_empty(), "an inline listener hands out no key op");
    l.assert_handshake_done();
    let info = &l.handshakes[0];
    assert_eq!(info.version, version);
    assert!(!info.resumed);

    l.client_send(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(
        l.conn.backend_out(),
        b"",
        "nothing for the backend before it is connected"
    );
    assert!(!l.conn.wants_backend_read());
    l.connect_backend();
    assert_eq!(l.backend_take(), b"GET / HTTP/1.1\r\n\r\n");

    assert!(l.conn.wants_backend_read());
    l.backend_send(b"HTTP/1.1 200 OK\r\n\r\nhello");
    assert_eq!(
        l.client_recv(),
        (
            b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec(),
            super::harness::Ending::Open
        )
    );
    assert_eq!(l.conn.closed(), None);
}

#[test]
fn tls13_inline_handshake_then_bytes_flow_both_ways() {
    inline_round_trip(TLS13, "TLSv1_3");
}

#[test]
fn tls12_inline_handshake_then_bytes_flow_both_ways() {
    inline_round_trip(TLS12, "TLSv1_2");
}

#[test]
fn client_hello_read_one_byte_at_a_time_still_completes() {
    for versions in [TLS13, TLS12] {
        let mut l = Link::new(
            inline_listener(),
            &Limits::default(),
            pki().client_config(versions),
        );
        l.read_chunk = 1;
        l.pump();
        l.assert_handshake_done();
    }
}

#[test]
fn bytes_that_are_not_tls_are_a_bad_client_hello() {
    let mut not_a_hello = Vec::new();
    // An HTTP request on the TLS port.
    not_a_hello.push(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec());
    // A well-formed handshake record holding a ServerHello (type 2) instead of a ClientHello.
    not_a_hello.push(vec![0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]);
    // An alert record where the hello should be.
    not_a_hello.push(vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
    // A record header announcing more than a record may hold.
    not_a_hello.push(vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01]);
    for bytes in not_a_hello {
        let mut l = Link::new(
            inline_listener(),
            &Limits::default(),
            pki().client_config(TLS13),
        );
        l.conn.on_client_data(&bytes, l.now);
        assert_eq!(
            l.conn.closed(),
            Some(CloseReason::BadClientHello),
            "input {bytes:02x?}"
        );
        assert!(l.conn.take_event().is_none());
        assert!(!l.conn.wants_client_read());
        assert!(!l.conn.wants_backend_read());
        assert_eq!(l.conn.backend_out(), b"");
        // Whatever the core left for the client is at most one fatal alert record.
        let out = l.conn.client_out();
        assert!(
            out.is_empty() || (out.len() == 7 && out[0] == 0x15 && out[5] == 2),
            "input {bytes:02x?} left {out:02x?}"
        );
    }
}

/// The ClientHello the given client config sends first, as bytes on the wire.
fn first_flight(client: std::sync::Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut c = rustls::ClientConnection::new(client, "localhost".try_into().expect("literal"))
        .expect("client");
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("Vec write");
    }
    out
}

/// A real client whose hello carries a long ALPN list: bigger than one record. Each call has its
/// own session store, so no ticket changes the hello's size.
fn big_hello_client() -> std::sync::Arc<rustls::ClientConfig> {
    let mut cfg = (*pki().client_config(TLS13)).clone();
    cfg.alpn_protocols = (0..100)
        .map(|i| format!("{i:0>200}").into_bytes())
        .collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    std::sync::Arc::new(cfg)
}

#[test]
fn client_hello_larger_than_the_limit_is_refused_at_the_limit() {
    let hello_len = first_flight(big_hello_client()).len();
    assert!(
        hello_len > 18 * 1024,
        "hello of {hello_len} bytes spans records"
    );

    // The default limit refuses it, before rustls has seen the whole hello.
    let mut l = Link::new(inline_listener(), &Limits::default(), big_hello_client());
    l.pump();
    assert_eq!(l.conn.closed(), Some(CloseReason::ClientHelloTooLarge));
    assert!(l.handshakes.is_empty());
    // A fatal alert, not a bare close (RFC 8446 §6).
    assert!(
        matches!(
            l.client_error,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::DecodeError
            ))
        ),
        "client saw {:?}",
        l.client_error
    );

    // One byte short of the hello: refused.
    let limits = Limits {
        max_client_hello_bytes: hello_len - 1,
        ..Limits::default()
    };
    let mut l = Link::new(inline_listener(), &limits, big_hello_client());
    l.pump();
    assert_eq!(l.conn.closed(), Some(CloseReason::ClientHelloTooLarge));
}

#[test]
fn client_hello_spanning_records_within_a_raised_limit_completes() {
    let hello_len = first_flight(big_hello_client()).len();
    let limits = Limits {
        max_client_hello_bytes: hello_len,
        ..Limits::default()
    };
    for read_chunk in [hello_len, 16 * 1024, 1000] {
        let mut l = Link::new(inline_listener(), &limits, big_hello_client());
        l.read_chunk = read_chunk;
        l.pump();
        l.assert_handshake_done();
        // The key-op worker replays the same multi-record flight.
        let mut l = Link::new(
            offload_listener(pki().server_config()),
            &limits,
            big_hello_client(),
        );
        l.read_chunk = read_chunk;
        l.pump();
        assert_eq!(l.jobs.len(), 1, "closed: {:?}", l.conn.closed());
        l.run_key_ops();
        l.assert_handshake_done();
    }
}

#[test]
fn client_hello_filling_the_limit_with_an_unfinished_record_is_refused_at_the_next_byte() {
    let mut l = Link::new(
        inline_listener(),
        &Limits::default(),
        pki().client_config(TLS13),
    );
    // A handshake record announcing the largest allowed body, sent in pieces.
    let mut head = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    head.extend_from_slice(&[0x01, 0x00, 0x3f, 0xfc]);
    l.conn.on_client_data(&head, l.now);
    let filler = vec![0u8; 16 * 1024 - head.len()];
    l.conn.on_client_data(&filler, l.now);
    assert_eq!(l.conn.closed(), None, "16 KiB exactly is within the limit");
    assert!(l.conn.wants_client_read());
    l.conn.on_client_data(&[0], l.now);
    assert_eq!(l.conn.closed(), Some(CloseReason::ClientHelloTooLarge));
    assert!(!l.conn.wants_client_read());
}

#[test]
fn unknown_sni_gets_unrecognized_name_alert() {
    let mut snap = snapshot(pki().server_config());
    snap.sni_filter = Some(SniFilter::new(|sni| sni == Some("served.example")));
    let mut l = Link::new(
        prepare(snap),
        &Limits::default(),
        pki().client_config(TLS13),
    );
    l.client_reading = false;
    l.pump();
    assert_eq!(l.conn.closed(), Some(CloseReason::UnknownSni));
    assert_eq!(l.conn.client_out(), ALERT_UNRECOGNIZED_NAME);
    l.client_reading = true;
    l.pump();
    assert!(
        matches!(
            l.client_error,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnrecognisedName
            ))
        ),
        "client saw {:?}",
        l.client_error
    );
    assert!(l.handshakes.is_empty());
}

#[test]
fn client_closing_during_the_hello_is_closed_early() {
    let mut l = Link::new(
        inline_listener(),
        &Limits::default(),
        pki().client_config(TLS13),
    );
    let flight = first_flight(pki().client_config(TLS13));
    l.conn.on_client_data(&flight[..flight.len() / 2], l.now);
    assert_eq!(l.conn.closed(), None);
    l.conn.on_client_eof(l.now);
    assert_eq!(l.conn.closed(), Some(CloseReason::ClientClosedEarly));
    assert_eq!(l.conn.client_out(), b"");
}

#[test]
fn handshake_timeout_fires_at_its_deadline_not_before() {
    let limits = Limits::default();
    let mut l = Link::new(inline_listener(), &limits, pki().client_config(TLS13));
    // Half a hello: the core waits for the rest.
    let flight = first_flight(pki().client_config(TLS13));
    l.conn.on_client_data(&flight[..10], l.now);
    let due = l.t0 + limits.handshake_timeout();
    assert_eq!(l.conn.deadline(), due);
    l.conn.on_timer(due - Duration::from_millis(1));
    assert_eq!(l.conn.closed(), None);
    // Bytes trickling in do not extend the handshake deadline.
    l.conn
        .on_client_data(&flight[10..20], due - Duration::from_millis(1));
    assert_eq!(l.conn.deadline(), due);
    l.conn.on_timer(due);
    assert_eq!(l.conn.closed(), Some(CloseReason::HandshakeTimeout));
}

#[test]
fn idle_timeout_counts_from_the_last_byte_either_way() {
    let limits = Limits::default();
    let idle = limits.idle_timeout();
    let mut l = Link::established_with(inline_listener(), &limits, TLS13);
    l.advance(idle - Duration::from_secs(1));
    l.client_send(b"ping");
    assert_eq!(l.backend_take(), b"ping");
    let last = l.now;
    assert_eq!(l.conn.deadline(), last + idle);
    l.conn.on_timer(last + idle - Duration::from_millis(1));
    assert_eq!(
        l.conn.closed(),
        None,
        "client traffic restarted the idle clock"
    );

    l.advance(idle - Duration::from_secs(1));
    l.backend_send(b"pong");
    let last = l.now;
    l.conn.on_timer(last + idle - Duration::from_millis(1));
    assert_eq!(
        l.conn.closed(),
        None,
        "backend traffic restarted the idle clock"
    );
    l.conn.on_timer(last + idle);
    assert_eq!(l.conn.closed(), Some(CloseReason::IdleTimeout));
}

#[test]
fn proxy_header_precedes_the_first_client_byte() {
    let mut snap = snapshot(pki().server_config());
    snap.proxy_protocol = true;
    let mut l = Link::established_with(prepare(snap), &Limits::default(), TLS13);
    l.client_send(b"hello");
    let got = l.backend_take();
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n", "PROXY v2 signature");
    assert_eq!(got[12], 0x21, "version 2, PROXY command");
    assert_eq!(got[13], 0x11, "TCP over IPv4");
    let len = usize::from(u16::from_be_bytes([got[14], got[15]]));
    let body = &got[16..16 + len];
    assert_eq!(&body[..4], &[192, 0, 2, 7], "source is the client");
    assert_eq!(
        &body[4..8],
        &[198, 51, 100, 1],
        "destination is our address"
    );
    assert_eq!(&body[8..10], &40000u16.to_be_bytes());
    assert_eq!(&body[10..12], &443u16.to_be_bytes());
    assert_eq!(
        &got[16 + len..],
        b"hello",
        "client bytes follow the header, once"
    );
}
