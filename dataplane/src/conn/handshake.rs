//! The client handshake: the ClientHello accepted inline (with the tripwire when key operations
//! are offloaded) or handed to a key-op worker, the second ClientHello after a
//! HelloRetryRequest, and the step from handshaking to established (identity, PROXY header,
//! backend stream).

use std::time::Instant;

use rustls::server::ServerConnection;
use rustls::HandshakeKind;

use super::buffer::ByteQueue;
use super::{identity, proxy_v2, CloseReason, Conn, Event, HandshakeInfo, KeyOpJob, Phase};
use super::{ALERT_INTERNAL_ERROR, ALERT_NO_APPLICATION_PROTOCOL, ALERT_UNRECOGNIZED_NAME};
use crate::keyops::tripwire::{attempt_inline, Inline};
use crate::pool::route::Selected;

/// What the client gets when a handshake fails before the io thread has a connection: the bytes
/// rustls queued when they are alerts only, else `internal_error`. A failed `into_connection()`
/// hands back everything it queued: after a signing failure that is the start of the server's
/// flight (ServerHello...) with no alert, which would leave the client with half a handshake
/// and a bare close.
pub(super) fn failure_bytes(queued: &[u8]) -> &[u8] {
    let mut rest = queued;
    while let [typ, _, _, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if *typ != 0x15 || tail.len() < len {
            return &ALERT_INTERNAL_ERROR;
        }
        rest = &tail[len..];
    }
    if queued.is_empty() || !rest.is_empty() {
        return &ALERT_INTERNAL_ERROR;
    }
    queued
}

/// The close reason for an error from rustls: a server only ever verifies client certificates,
/// so certificate errors are the client's; nothing in common is a negotiation failure, a hello
/// rustls cannot parse or that breaks the protocol is a bad hello.
pub(super) fn tls_failure(e: &rustls::Error) -> CloseReason {
    match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            CloseReason::ClientCertRejected
        }
        rustls::Error::PeerIncompatible(_) => CloseReason::NegotiationFailed,
        rustls::Error::InvalidMessage(_) | rustls::Error::PeerMisbehaved(_) => {
            CloseReason::BadClientHello
        }
        _ => CloseReason::TlsError,
    }
}

/// Queues what rustls has for the client after `e`. One correction: a TLS 1.2 client that sent
/// no certificate where one is required gets `handshake_failure` (40), the alert TLS 1.2 defines
/// for it (RFC 5246 §7.4.6), not rustls's `certificate_required` (116), which only TLS 1.3 has.
/// The alert is still in plaintext then (the server has not sent ChangeCipherSpec).
pub(super) fn write_failure(tls: &mut ServerConnection, e: &rustls::Error, out: &mut ByteQueue) {
    let mut bytes = Vec::new();
    let _ = tls.write_tls(&mut bytes);
    if matches!(e, rustls::Error::NoCertificatesPresented)
        && tls.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2)
    {
        const CERTIFICATE_REQUIRED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 116];
        if bytes.ends_with(&CERTIFICATE_REQUIRED) {
            let last = bytes.len() - 1;
            bytes[last] = 40;
        }
    }
    out.push(&bytes);
}

impl Conn {
    pub(super) fn try_accept(&mut self, now: Instant) {
        let Phase::Hello { acceptor, flight } = &mut self.phase else {
            return;
        };
        let accepted = match acceptor.accept() {
            Ok(None) => return,
            Ok(Some(a)) => a,
            Err((_, mut alert)) => {
                let _ = alert.write_all(&mut self.to_client);
                self.fail(CloseReason::BadClientHello);
                return;
            }
        };
        // An ACME tls-alpn-01 validation (RFC 8737) for a name with a pending challenge: the
        // challenge certificate (a software key, signed inline), then close. Before the SNI
        // filter and routing: the name may have no certificate and no route yet.
        if let Some(acme) = &self.listener.snap.acme_tls_alpn {
            let hello = accepted.client_hello();
            let offered: Option<Vec<&[u8]>> = hello.alpn().map(|a| a.collect());
            if let Some(config) = acme.config_for(hello.server_name(), offered.as_deref()) {
                self.upstream.acme_challenge = true;
                match accepted.into_connection(config) {
                    Ok(tls) => self.enter_tls(Box::new(tls), now),
                    Err((e, mut alert)) => {
                        let mut queued = Vec::new();
                        let _ = alert.write_all(&mut queued);
                        self.to_client.push(failure_bytes(&queued));
                        self.fail(tls_failure(&e));
                    }
                }
                return;
            }
        }
        if let Some(filter) = &self.listener.snap.sni_filter {
            if !filter.allows(accepted.client_hello().server_name()) {
                self.to_client.push(&ALERT_UNRECOGNIZED_NAME);
                self.fail(CloseReason::UnknownSni);
                return;
            }
        }
        // Routing: the pool by SNI and the offered protocols, and so the protocol the server
        // answers with, before rustls chooses the certificate.
        let hello = accepted.client_hello();
        let offered: Option<Vec<&[u8]>> = hello.alpn().map(|a| a.collect());
        let selected = self
            .listener
            .routes
            .select(hello.server_name(), offered.as_deref());
        let alpn = match selected {
            Selected::Pool { pool, alpn, .. } => {
                self.upstream.pool = Some(pool);
                alpn
            }
            Selected::UnknownName => {
                self.to_client.push(&ALERT_UNRECOGNIZED_NAME);
                self.fail(CloseReason::UnknownSni);
                return;
            }
            Selected::NoProtocol => {
                self.to_client.push(&ALERT_NO_APPLICATION_PROTOCOL);
                self.fail(CloseReason::NoApplicationProtocol);
                return;
            }
        };
        let flight = std::mem::take(flight);
        let (real, tripwire) = self.listener.configs_for(alpn.as_deref());
        self.upstream.alpn = alpn;
        let tripwire = if self.danger_inline { None } else { tripwire };
        let Some(tripwire) = tripwire else {
            match accepted.into_connection(real) {
                Ok(tls) => self.enter_tls(Box::new(tls), now),
                Err((e, mut alert)) => {
                    let mut queued = Vec::new();
                    let _ = alert.write_all(&mut queued);
                    self.to_client.push(failure_bytes(&queued));
                    self.fail(tls_failure(&e));
                }
            }
            return;
        };
        match attempt_inline(accepted, &flight, &real, tripwire) {
            Inline::Resumed(tls) => {
                self.enter_tls(tls, now);
                return;
            }
            Inline::Refused { error, alert } => {
                self.to_client.push(failure_bytes(&alert));
                self.fail(tls_failure(&error));
                return;
            }
            Inline::NeedsKeyOp => {}
        }
        self.phase = Phase::KeyOp;
        self.events.push(Event::Offload(KeyOpJob {
            flight,
            config: real,
            connection: None,
            backend: None,
        }));
    }

    /// Key operations of this connection run on workers (see [`KeyOpJob`]).
    pub(super) fn offloads(&self) -> bool {
        self.listener.tripwire_tls.is_some() && !self.danger_inline
    }

    /// Hands the connection to a worker to process what it has read: the second ClientHello
    /// after a HelloRetryRequest, on an offloaded listener.
    pub(super) fn offload_second_hello(&mut self) {
        self.flush_tls();
        let (Phase::Handshaking(tls) | Phase::Established(tls)) =
            std::mem::replace(&mut self.phase, Phase::KeyOp)
        else {
            return;
        };
        self.events.push(Event::Offload(KeyOpJob {
            flight: Vec::new(),
            config: self.listener.snap.tls.clone(),
            connection: Some(tls),
            backend: None,
        }));
    }

    pub(super) fn enter_tls(&mut self, mut tls: Box<ServerConnection>, now: Instant) {
        // Plaintext flow is bounded by our own queues and read pausing, not by rustls's limit.
        tls.set_buffer_limit(None);
        self.phase = Phase::Handshaking(tls);
        // Records that arrived with the hello sit in rustls's buffer until processed.
        if let Some(tls) = self.phase.tls() {
            if let Err(e) = tls.process_new_packets() {
                write_failure(tls, &e, &mut self.to_client);
                self.fail(tls_failure(&e));
                return;
            }
        }
        self.pump_client(now);
    }

    pub(super) fn check_established(&mut self, now: Instant) {
        let proxy = self.pool_proxy_protocol();
        match std::mem::replace(&mut self.phase, Phase::KeyOp) {
            Phase::Handshaking(tls) if !tls.is_handshaking() => {
                self.phase = Phase::Established(tls);
            }
            other => {
                self.phase = other;
                return;
            }
        }
        let Some(tls) = self.phase.tls() else {
            return;
        };
        // RFC 8737 §3: the validator closes after the handshake; nothing goes to a backend.
        if self.upstream.acme_challenge {
            self.close_without_backend(CloseReason::Done);
            return;
        }
        // A resumed session carries the client certificate it was made with (or none); the
        // listener's trust (CRLs) or mode may have changed since, so check it again before any
        // byte moves on.
        if matches!(tls.handshake_kind(), Some(HandshakeKind::Resumed)) {
            if let Some(check) = &self.listener.snap.client_cert_check {
                if !check.allows_resumed(tls.peer_certificates()) {
                    self.fail(CloseReason::ClientCertRejected);
                    return;
                }
            }
        }
        let version = match tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1_3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1_2",
            _ => "other",
        };
        let suite = tls
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown");
        let group = tls
            .negotiated_key_exchange_group()
            .and_then(|g| g.name().as_str())
            .unwrap_or("none");
        let resumed = matches!(tls.handshake_kind(), Some(HandshakeKind::Resumed));
        self.events.push(Event::HandshakeDone(HandshakeInfo {
            version,
            suite,
            group,
            resumed,
            duration: now.saturating_duration_since(self.accepted_at),
        }));
        // The backend connect starts now, so the PROXY header (and the client identity in it)
        // is built here, when the identity is known.
        let header = proxy.then(|| {
            let facts = identity::Facts {
                version: tls.protocol_version(),
                suite: tls.negotiated_cipher_suite(),
                sni: tls.server_name(),
                alpn: tls.alpn_protocol(),
                peer_certs: tls.peer_certificates(),
                resumed,
            };
            match identity::tlvs(&facts).or_else(|| identity::plain_tlvs(&facts)) {
                Some(tlvs) => proxy_v2::header_with_tlvs(self.peer, self.local, &tlvs),
                None => proxy_v2::header(self.peer, self.local),
            }
        });
        self.start_backend_stream(header);
    }
}
