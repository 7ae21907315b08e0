//! The backend TLS pump: the backend `ClientConnection` started once the client handshake is
//! established, client plaintext encrypted towards the backend, backend records decrypted
//! towards the client, and the backend handshake parked on a key-op worker when its client key
//! is on the token.

use std::io::{self, Read, Write};

use rustls::client::ClientConnection;

use super::buffer::ByteQueue;
use super::{is_key_failure, BackendSession, Closing, KeyOpResult};
use super::{BackendTlsCause, CloseReason, Conn, Event, KeyOpDone, KeyOpFailure, KeyOpJob};

impl Conn {
    /// The backend handshake's records go through a key-op worker: its client key is on the
    /// token, and rustls signs for a CertificateRequest inside `process_new_packets`. Which
    /// flight holds one is not visible from outside rustls (TLS 1.3 encrypts it; TLS 1.2 may send
    /// it in the ServerHello's record), so every flight of the backend handshake goes.
    pub(super) fn backend_offloads(&self) -> bool {
        !self.danger_inline
            && self
                .listener
                .snap
                .backend_tls
                .as_ref()
                .is_some_and(|b| b.offload_key_ops)
    }

    /// Parks the backend session on a worker with the records it has read; `unread` (what
    /// rustls would not buffer) waits on the core for the session to come back.
    pub(super) fn offload_backend(&mut self, unread: &[u8]) {
        let mut backlog = ByteQueue::default();
        backlog.push(unread);
        let backend = match std::mem::replace(
            &mut self.backend_session,
            BackendSession::OnWorker { backlog },
        ) {
            BackendSession::Here(backend) => backend,
            other => {
                self.backend_session = other;
                return;
            }
        };
        self.events.push(Event::Offload(KeyOpJob {
            flight: Vec::new(),
            config: self.listener.snap.tls.clone(),
            connection: None,
            backend: Some(backend),
        }));
    }

    /// The worker's answer for the backend session: pumping resumes (with the records that
    /// arrived meanwhile), or the connection ends. A token that failed or answered late ends it
    /// as for a client handshake (`key_op_failed`, `key_op_timeout`, `key_op_rejected`); what
    /// rustls refused in the backend's records is a backend TLS error, as inline.
    pub(super) fn on_backend_key_op_done(&mut self, result: KeyOpResult) {
        let pending = match std::mem::replace(&mut self.backend_session, BackendSession::None) {
            BackendSession::OnWorker { backlog } => backlog,
            _ => ByteQueue::default(),
        };
        let reason = match result {
            Ok(KeyOpDone::Backend(backend)) => {
                self.backend_session = BackendSession::Here(backend);
                self.drain_backend_plaintext();
                // Also flushes the client's flight to the backend and the plaintext that waited.
                self.on_backend_tls_data(pending.as_slice());
                return;
            }
            Ok(KeyOpDone::Client(_)) => CloseReason::KeyOpFailed,
            Err(KeyOpFailure::Tls { error, .. }) if !is_key_failure(&error) => {
                self.fail_backend_tls(BackendTlsCause::of(&error), Some(&error));
                return;
            }
            Err(KeyOpFailure::Tls { error, .. }) => {
                tracing::warn!(listener = %self.listener.snap.name, backend = ?self.backend(), error = %error, "backend TLS client signature failed");
                CloseReason::KeyOpFailed
            }
            Err(KeyOpFailure::Rejected) => CloseReason::KeyOpRejected,
            Err(KeyOpFailure::Deadline) => CloseReason::KeyOpTimeout,
        };
        // The client's session is established: it learns the backend is gone, not why.
        if let Some(tls) = self.phase.tls() {
            tls.send_close_notify();
        }
        self.flush_tls();
        self.fail(reason);
    }

    /// Queues what the backend must see first: the PROXY header in clear, then (TLS backends)
    /// the ClientHello.
    pub(super) fn start_backend_stream(&mut self, header: Option<Vec<u8>>) {
        let Some(bt) = self.pool_backend_tls() else {
            if let Some(h) = header {
                self.to_backend.prepend(&h);
            }
            return;
        };
        if let Some(h) = header {
            self.backend_wire.push(&h);
        }
        match ClientConnection::new(bt.config, bt.server_name) {
            Ok(mut c) => {
                // Bounded by our own queues, as on the client side.
                c.set_buffer_limit(None);
                self.backend_session = BackendSession::Here(Box::new(c));
                self.pump_backend_tls();
            }
            Err(e) => self.fail_backend_tls(BackendTlsCause::of(&e), Some(&e)),
        }
    }

    /// Encrypts queued client plaintext for the backend (once its handshake is done, as far as
    /// the wire queue's bound allows), sends close_notify after the client's last byte, and
    /// moves rustls's records to the wire queue.
    pub(super) fn pump_backend_tls(&mut self) {
        let Some(bt) = self.backend_session.here() else {
            return;
        };
        if !bt.is_handshaking() {
            while !self.to_backend.is_empty() && self.backend_wire.len() < self.cap {
                let room = self.cap - self.backend_wire.len();
                let chunk = &self.to_backend.as_slice()[..self.to_backend.len().min(room)];
                match bt.writer().write(chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.to_backend.consume(n),
                }
                while bt.wants_write() {
                    match bt.write_tls(&mut self.backend_wire) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            if self.client_to_backend == Closing::ReadClosed && self.to_backend.is_empty() {
                bt.send_close_notify();
                self.client_to_backend.reach(Closing::CloseNotifySent);
            }
        }
        while bt.wants_write() {
            match bt.write_tls(&mut self.backend_wire) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// TLS records from the backend: through rustls, plaintext on to the client.
    pub(super) fn on_backend_tls_data(&mut self, data: &[u8]) {
        if let BackendSession::OnWorker { backlog } = &mut self.backend_session {
            backlog.push(data);
            return;
        }
        let offloads = self.backend_offloads();
        let mut rd = data;
        while !rd.is_empty() && self.closed().is_none() {
            let Some(bt) = self.backend_session.here() else {
                return;
            };
            match bt.read_tls(&mut rd) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let err = rustls::Error::General(format!("reading backend records: {e}"));
                    self.fail_backend_tls(BackendTlsCause::ProtocolError, Some(&err));
                    return;
                }
            }
            if offloads && bt.is_handshaking() {
                // As much of the flight as rustls buffers unprocessed goes along; the rest
                // waits on the core for the session to come back.
                while !rd.is_empty() && matches!(bt.read_tls(&mut rd), Ok(n) if n > 0) {}
                self.offload_backend(rd);
                self.flush_tls();
                return;
            }
            if let Err(e) = bt.process_new_packets() {
                self.fail_backend_tls(BackendTlsCause::of(&e), Some(&e));
                return;
            }
            // Drained after every record batch so rustls's own plaintext buffer stays small.
            self.drain_backend_plaintext();
        }
        if self.closed().is_none() {
            self.pump_backend_tls();
            self.flush_tls();
            self.after_progress();
        }
    }

    /// Moves decrypted backend bytes into the client's TLS session; the backend's close_notify
    /// becomes ours to the client.
    pub(super) fn drain_backend_plaintext(&mut self) {
        let (Some(bt), Some(tls)) = (self.backend_session.here(), self.phase.tls()) else {
            return;
        };
        let mut buf = [0u8; 8192];
        let mut finished = false;
        loop {
            match bt.reader().read(&mut buf) {
                Ok(0) => {
                    finished = true;
                    break;
                }
                Ok(n) => {
                    if tls.writer().write_all(&buf[..n]).is_err() {
                        self.fail(CloseReason::TlsError);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The backend closed without close_notify.
                    finished = true;
                    break;
                }
            }
        }
        if finished && self.backend_to_client == Closing::Open {
            tls.send_close_notify();
            self.backend_to_client.reach(Closing::CloseNotifySent);
        }
        self.flush_tls();
    }

    /// Ends the connection for a backend TLS failure: log line naming the cause, counted by
    /// the driver under `backend_tls_error` and per cause.
    pub(super) fn fail_backend_tls(
        &mut self,
        cause: BackendTlsCause,
        error: Option<&rustls::Error>,
    ) {
        let backend = self.backend().and_then(|(_, s)| s);
        let server_name = self
            .pool_backend_tls()
            .as_ref()
            .map(|b| b.server_name.to_str().into_owned())
            .unwrap_or_default();
        match error {
            Some(e) => {
                tracing::warn!(listener = %self.listener.snap.name, ?backend, %server_name, reason = cause.as_str(), error = %e, "backend TLS failed: {}", cause.describe())
            }
            None => {
                tracing::warn!(listener = %self.listener.snap.name, ?backend, %server_name, reason = cause.as_str(), "backend TLS failed: {}", cause.describe())
            }
        }
        // The client's session ends cleanly: it learns the backend is gone, not why.
        if let Some(tls) = self.phase.tls() {
            tls.send_close_notify();
        }
        self.flush_tls();
        self.fail(CloseReason::BackendTlsError(cause));
    }
}
