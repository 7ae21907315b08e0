//! Where a connection is, as values rather than flags: the client side's phase (`Phase`), the
//! backend's TLS session (`BackendSession`), the steps each direction takes toward its end
//! (`Closing`), and the client's FIN (`ClientFin`). Each variant holds what exists in it, so a
//! combination that cannot happen cannot be written.

use rustls::client::ClientConnection;
use rustls::server::{Acceptor, ServerConnection};

use super::buffer::ByteQueue;
use super::CloseReason;

/// Where the client side of a connection is. Each variant holds what exists in that phase: the
/// acceptor and the raw flight only while the ClientHello is read, the rustls session once it
/// exists, the close reason once it has ended.
pub(super) enum Phase {
    /// Reading the ClientHello flight: rustls's `Acceptor`, and every byte read so far (kept
    /// for a replay on a key-op worker).
    Hello {
        acceptor: Box<Acceptor>,
        flight: Vec<u8>,
    },
    /// The client's session is on a key-op worker (the first ClientHello replayed, or the
    /// second after a HelloRetryRequest); the client is not read meanwhile.
    KeyOp,
    /// rustls has the session here and the handshake is not done yet.
    Handshaking(Box<ServerConnection>),
    /// The handshake is done (`Event::HandshakeDone` went out): bytes are proxied.
    Established(Box<ServerConnection>),
    /// The connection ended, for this reason.
    Closed(CloseReason),
}

impl Phase {
    /// The client's session while rustls holds it on this core (handshaking or established).
    pub(super) fn tls(&mut self) -> Option<&mut ServerConnection> {
        match self {
            Phase::Handshaking(tls) | Phase::Established(tls) => Some(tls),
            _ => None,
        }
    }

    /// Whether rustls holds the client's session on this core.
    pub(super) fn has_tls(&self) -> bool {
        matches!(self, Phase::Handshaking(_) | Phase::Established(_))
    }
}

/// The TLS session to the backend, for a pool whose backend speaks TLS.
pub(super) enum BackendSession {
    /// No TLS to the backend: it speaks plain TCP, or the backend stream has not started.
    None,
    /// Our `ClientConnection`, here on the core.
    Here(Box<ClientConnection>),
    /// On a key-op worker during the backend handshake (its client key is on the token): the
    /// backend is not read, and records a driver still delivers wait in `backlog` until the
    /// session is back.
    OnWorker { backlog: ByteQueue },
}

impl BackendSession {
    /// The session while it is on this core.
    pub(super) fn here(&mut self) -> Option<&mut ClientConnection> {
        match self {
            BackendSession::Here(c) => Some(c),
            _ => None,
        }
    }

    pub(super) fn on_worker(&self) -> bool {
        matches!(self, BackendSession::OnWorker { .. })
    }
}

/// How far one direction of a connection has got toward its end. Each step implies the ones
/// before it (the order of the variants), so a direction is one value, never a set of flags that
/// could disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Closing {
    /// Bytes flow.
    Open,
    /// The sending side's stream is over: its close_notify, or its FIN, was read.
    ReadClosed,
    /// We sent close_notify to the receiving side (only where that side speaks TLS).
    CloseNotifySent,
    /// The driver shut the write side of the receiving side's socket.
    WriteShut,
}

impl Closing {
    /// Moves on to `step` unless already past it.
    pub(super) fn reach(&mut self, step: Closing) {
        *self = (*self).max(step);
    }
}

/// How far the client's FIN has got. Apart from [`Closing`]: the client may send close_notify
/// before its FIN or not at all, so the FIN and the end of its stream come in either order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientFin {
    /// Not received.
    NotYet,
    /// Received; rustls is told once every byte before it went in.
    Received,
    /// Passed to rustls (an empty read).
    Signaled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direction_never_steps_back() {
        let mut c = Closing::Open;
        c.reach(Closing::CloseNotifySent);
        c.reach(Closing::ReadClosed);
        assert_eq!(c, Closing::CloseNotifySent, "a later step is kept");
        c.reach(Closing::WriteShut);
        c.reach(Closing::Open);
        assert_eq!(c, Closing::WriteShut);
    }

    #[test]
    fn only_a_session_here_is_lent_out() {
        let mut hello = Phase::Hello {
            acceptor: Box::default(),
            flight: Vec::new(),
        };
        assert!(hello.tls().is_none() && !hello.has_tls());
        assert!(Phase::KeyOp.tls().is_none());
        assert!(Phase::Closed(CloseReason::Done).tls().is_none());
        let mut worker = BackendSession::OnWorker {
            backlog: ByteQueue::default(),
        };
        assert!(worker.on_worker() && worker.here().is_none());
        assert!(!BackendSession::None.on_worker());
    }
}
