//! Key operations off the io thread: the job a connection hands out (`Event::Offload`), what a
//! worker does with it ([`run_key_op`]), and the answer the connection takes back in
//! `Conn::on_key_op_done`. A worker is where rustls signs, so a slow token stalls a worker,
//! never a core.

use std::sync::Arc;

use rustls::client::ClientConnection;
use rustls::server::{Acceptor, ServerConnection};
use rustls::ServerConfig;

/// Work for a key-operation worker: replay the ClientHello flight through a fresh `Acceptor` and
/// run `into_connection()` (which signs) off the io thread; or, after a HelloRetryRequest,
/// process the second ClientHello (where a full handshake signs) on the connection itself; or
/// process the backend's handshake records on our backend `ClientConnection` (where a requested
/// client certificate is signed for).
#[derive(Debug)]
pub struct KeyOpJob {
    /// Every byte the client sent so far (the ClientHello records, and anything after them);
    /// empty when `connection` or `backend` is set.
    pub flight: Vec<u8>,
    /// The real (signing) configuration.
    pub config: Arc<ServerConfig>,
    /// A connection that answered with a HelloRetryRequest and has read, not processed, the
    /// client's next records.
    pub connection: Option<Box<ServerConnection>>,
    /// The backend side during its handshake, with the backend's records read, not processed.
    pub backend: Option<Box<ClientConnection>>,
}

/// What a key operation hands back: the connection the job carried, now processed.
#[derive(Debug)]
pub enum KeyOpDone {
    /// The client's session (a handshake job).
    Client(Box<ServerConnection>),
    /// The backend session (a [`KeyOpJob::backend`] job).
    Backend(Box<ClientConnection>),
}

/// How a key operation ended.
#[derive(Debug)]
pub enum KeyOpFailure {
    /// rustls (or the token, through `SigningKey`) refused; `alert` holds the bytes to send.
    Tls {
        /// The error from rustls.
        error: rustls::Error,
        /// Alert record bytes for the client.
        alert: Vec<u8>,
    },
    /// The queue (per core or total) was full.
    Rejected,
    /// The result came, or would come, after the deadline.
    Deadline,
}

/// The worker's answer.
pub type KeyOpResult = Result<KeyOpDone, KeyOpFailure>;

/// Runs on a key-op worker: the same bytes, a fresh `Acceptor`, the real config; or the
/// connection a job carries, processing what it has read.
pub fn run_key_op(job: KeyOpJob) -> KeyOpResult {
    if let Some(backend) = job.backend {
        return process_backend_on_worker(backend);
    }
    if let Some(tls) = job.connection {
        return process_on_worker(tls);
    }
    let replay_failed = |e: String| KeyOpFailure::Tls {
        error: rustls::Error::General(format!("replaying ClientHello: {e}")),
        alert: Vec::new(),
    };
    let mut acceptor = Acceptor::default();
    let mut rd = &job.flight[..];
    // Read and accept in turns, as the io thread did (see `Conn::on_client_data`).
    let accepted = loop {
        if rd.is_empty() {
            return Err(replay_failed("incomplete".into()));
        }
        match acceptor.read_tls(&mut rd) {
            Ok(n) if n > 0 => {}
            Ok(_) => return Err(replay_failed("bytes refused".into())),
            Err(e) => return Err(replay_failed(e.to_string())),
        }
        match acceptor.accept() {
            Ok(Some(a)) => break a,
            Ok(None) => {}
            Err((error, mut alert)) => {
                let mut bytes = Vec::new();
                let _ = alert.write_all(&mut bytes);
                return Err(KeyOpFailure::Tls {
                    error,
                    alert: bytes,
                });
            }
        }
    };
    let mut tls = accepted
        .into_connection(job.config)
        .map_err(|(error, mut alert)| {
            let mut bytes = Vec::new();
            let _ = alert.write_all(&mut bytes);
            KeyOpFailure::Tls {
                error,
                alert: bytes,
            }
        })?;
    // What followed the hello in the flight, processed here: after a HelloRetryRequest a client
    // that guessed it may already have sent the second hello, and that one signs.
    while !rd.is_empty() {
        match tls.read_tls(&mut rd) {
            Ok(n) if n > 0 => {}
            Ok(_) => return Err(replay_failed("bytes after the hello refused".into())),
            Err(e) => return Err(replay_failed(e.to_string())),
        }
    }
    process_on_worker(Box::new(tls))
}

/// Processing is where rustls signs (a second ClientHello), so it happens here, off the io
/// thread; a failure hands back what rustls queued for the client.
fn process_on_worker(mut tls: Box<ServerConnection>) -> KeyOpResult {
    match tls.process_new_packets() {
        Ok(_) => Ok(KeyOpDone::Client(tls)),
        Err(error) => {
            let mut alert = Vec::new();
            let _ = tls.write_tls(&mut alert);
            Err(KeyOpFailure::Tls { error, alert })
        }
    }
}

/// The backend's handshake records, processed off the io thread: a CertificateRequest among
/// them makes rustls sign with the client key right here. A failure drops the session (the
/// client learns the backend is gone, not why, so no alert comes back).
fn process_backend_on_worker(mut backend: Box<ClientConnection>) -> KeyOpResult {
    match backend.process_new_packets() {
        Ok(_) => Ok(KeyOpDone::Backend(backend)),
        Err(error) => Err(KeyOpFailure::Tls {
            error,
            alert: Vec::new(),
        }),
    }
}

/// The key-op outcome a worker's answer counts as.
pub(crate) fn outcome(result: &KeyOpResult) -> crate::stats::KeyOpOutcome {
    match result {
        Ok(_) => crate::stats::KeyOpOutcome::Ok,
        Err(f) => f.outcome(),
    }
}

/// Whether a failed key-op step failed in the key rather than in the peer's handshake. A
/// `SigningKey` reports a failed PKCS#11 call as `rustls::Error::Other` (rustls passes a
/// signer's error through unchanged); everything else rustls decides about the peer's hello.
pub fn is_key_failure(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::Other(_))
}

impl KeyOpFailure {
    /// The key-op outcome this failure counts as: only a key failure is `failed`.
    pub(crate) fn outcome(&self) -> crate::stats::KeyOpOutcome {
        use crate::stats::KeyOpOutcome;
        match self {
            KeyOpFailure::Tls { error, .. } if is_key_failure(error) => KeyOpOutcome::Failed,
            KeyOpFailure::Tls { .. } => KeyOpOutcome::PeerRefused,
            KeyOpFailure::Rejected => KeyOpOutcome::Failed,
            KeyOpFailure::Deadline => KeyOpOutcome::TimedOut,
        }
    }
}
