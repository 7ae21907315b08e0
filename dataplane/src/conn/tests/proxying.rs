//! An established connection: half-closes each way, resets, and the bounds that stop reading.

use super::harness::{inline_listener, Ending, Link, TLS12, TLS13};
use crate::config::Limits;
use crate::conn::CloseReason;

/// After the handshake the driver closes on `closed()`, or once `is_finished()`; this follows
/// the shutdowns the core asks for, as a driver does.
fn honour_shutdowns(l: &mut Link) {
    if l.conn.wants_backend_shutdown() {
        l.conn.backend_write_shut();
    }
    if l.conn.wants_client_shutdown() {
        l.conn.client_write_shut();
    }
}

#[test]
fn client_close_notify_half_closes_the_backend_and_replies_still_flow() {
    for versions in [TLS13, TLS12] {
        let mut l = Link::established(versions);
        l.client_send(b"request");
        l.client_close_notify();
        assert!(
            !l.conn.wants_backend_shutdown(),
            "not before the backend has every byte"
        );
        assert_eq!(l.backend_take(), b"request");
        assert!(l.conn.wants_backend_shutdown());
        l.conn.backend_write_shut();
        assert!(!l.conn.wants_backend_shutdown(), "asked once");
        assert!(
            !l.conn.wants_client_read(),
            "the client has finished sending"
        );

        // The other direction is still open.
        assert!(l.conn.wants_backend_read());
        l.backend_send(b"response");
        assert_eq!(l.client_recv(), (b"response".to_vec(), Ending::Open));
        assert!(!l.conn.is_finished());

        l.backend_eof();
        assert_eq!(l.client_recv(), (Vec::new(), Ending::CloseNotify));
        assert!(l.conn.wants_client_shutdown());
        l.conn.client_write_shut();
        assert!(l.conn.is_finished());
        assert_eq!(l.conn.closed(), None, "a clean end is not a failure");
    }
}

#[test]
fn client_fin_without_close_notify_half_closes_the_backend_too() {
    let mut l = Link::established(TLS13);
    l.client_send(b"last words");
    l.client_fin();
    assert_eq!(l.backend_take(), b"last words");
    assert!(l.conn.wants_backend_shutdown());
    l.conn.backend_write_shut();
    l.backend_send(b"still heard");
    assert_eq!(l.client_recv().0, b"still heard");
}

#[test]
fn backend_eof_sends_close_notify_while_the_client_may_still_send() {
    let mut l = Link::established(TLS13);
    l.client_send(b"one");
    l.backend_send(b"bye");
    l.backend_eof();
    assert_eq!(l.client_recv(), (b"bye".to_vec(), Ending::CloseNotify));
    assert!(!l.conn.wants_backend_read());
    assert!(l.conn.wants_client_shutdown());
    l.conn.client_write_shut();
    assert!(!l.conn.is_finished(), "the client has not finished");

    assert!(l.conn.wants_client_read());
    l.client_send(b" two");
    assert_eq!(l.backend_take(), b"one two");
    l.client_close_notify();
    honour_shutdowns(&mut l);
    assert!(l.conn.is_finished());
    assert_eq!(l.conn.closed(), None);
}

#[test]
fn backend_eof_before_any_data_is_an_empty_clean_stream() {
    let mut l = Link::established(TLS12);
    l.backend_eof();
    assert_eq!(l.client_recv(), (Vec::new(), Ending::CloseNotify));
    assert_eq!(l.conn.closed(), None);
    assert!(l.conn.wants_client_shutdown());
}

#[test]
fn backend_reset_after_data_is_not_a_clean_close_for_the_client() {
    let mut l = Link::established(TLS13);
    l.client_reading = false;
    l.backend_send(b"partial answer");
    l.conn.abort(CloseReason::BackendIoError);
    assert_eq!(l.conn.closed(), Some(CloseReason::BackendIoError));
    assert!(!l.conn.wants_client_shutdown());
    assert!(!l.conn.wants_backend_read());
    // The driver writes what was queued, then closes the socket.
    l.client_reading = true;
    l.pump();
    l.client_socket_closed();
    assert_eq!(
        l.client_recv(),
        (b"partial answer".to_vec(), Ending::Truncated),
        "the data arrives, but no close_notify vouches for its end"
    );
}

#[test]
fn backend_reset_before_data_leaves_nothing_for_either_side() {
    let mut l = Link::established(TLS13);
    l.client_send(b"never delivered");
    l.conn.abort(CloseReason::BackendIoError);
    assert_eq!(l.conn.closed(), Some(CloseReason::BackendIoError));
    assert_eq!(l.conn.backend_out(), b"", "queued client bytes are dropped");
    assert!(!l.conn.wants_client_read());
    l.client_socket_closed();
    assert_eq!(l.client_recv(), (Vec::new(), Ending::Truncated));
    // A later abort keeps the first reason.
    l.conn.abort(CloseReason::ClientIoError);
    assert_eq!(l.conn.closed(), Some(CloseReason::BackendIoError));
}

#[test]
fn backend_not_draining_stops_client_reads_at_the_bound() {
    let limits = Limits {
        buffer_bytes: 16 * 1024,
        ..Limits::default()
    };
    let mut l = Link::established_with(inline_listener(), &limits, TLS13);
    let sent: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    l.client_send(&sent);
    assert!(
        !l.conn.wants_client_read(),
        "reading stops while the backend lags"
    );
    assert!(l.conn.backend_out().len() >= limits.buffer_bytes);
    assert!(
        l.client_unread() > 100 * 1024,
        "most of the client's bytes wait in its socket, not in the core"
    );

    let mut got = Vec::new();
    while got.len() < sent.len() {
        let queued = l.conn.backend_out().len();
        assert!(
            queued > 0,
            "stalled with {} of {} bytes",
            got.len(),
            sent.len()
        );
        assert!(
            queued <= 2 * limits.buffer_bytes,
            "backend queue {queued} bytes past its bound"
        );
        // The backend takes one queue's worth; reading resumes.
        let chunk = l.conn.backend_out().to_vec();
        l.conn.backend_written(chunk.len(), l.now);
        got.extend_from_slice(&chunk);
        l.pump();
    }
    assert_eq!(got, sent);
    assert!(l.conn.wants_client_read());
}

#[test]
fn client_not_reading_stops_backend_reads_at_the_bound() {
    let limits = Limits {
        buffer_bytes: 16 * 1024,
        ..Limits::default()
    };
    let mut l = Link::established_with(inline_listener(), &limits, TLS12);
    l.client_reading = false;
    let mut sent = Vec::new();
    let mut i = 0u32;
    while l.conn.wants_backend_read() {
        let chunk: Vec<u8> = (0..4096).map(|j| ((i * 4096 + j) % 253) as u8).collect();
        l.backend_send(&chunk);
        sent.extend_from_slice(&chunk);
        i += 1;
        assert!(i < 1000, "backend reads never paused");
    }
    assert!(l.conn.client_out().len() >= limits.buffer_bytes);
    assert!(sent.len() < 3 * limits.buffer_bytes);

    l.client_reading = true;
    l.pump();
    assert!(
        l.conn.wants_backend_read(),
        "reading resumes once the client drained"
    );
    assert_eq!(l.client_recv().0, sent);
}

#[test]
fn client_reset_drops_what_was_queued_for_the_backend() {
    let mut l = Link::established(TLS13);
    l.client_send(b"queued");
    l.conn.abort(CloseReason::ClientIoError);
    assert_eq!(l.conn.closed(), Some(CloseReason::ClientIoError));
    assert_eq!(l.conn.backend_out(), b"");
    assert!(!l.conn.wants_backend_read());
    assert!(!l.conn.wants_backend_shutdown());
}

#[test]
fn client_finishing_before_the_backend_connects_is_delivered_then_shut() {
    let mut l = Link::new(
        inline_listener(),
        &Limits::default(),
        super::harness::pki().client_config(TLS13),
    );
    l.pump();
    l.assert_handshake_done();
    l.client_send(b"early");
    l.client_close_notify();
    assert!(
        !l.conn.wants_backend_shutdown(),
        "no shutdown of a socket not yet connected"
    );
    l.connect_backend();
    assert!(!l.conn.wants_backend_shutdown(), "bytes first");
    assert_eq!(l.backend_take(), b"early");
    assert!(l.conn.wants_backend_shutdown());
}
