//! Serving the API: a unix socket whose clients are named by their uid (SO_PEERCRED), and HTTPS
//! whose clients must present a certificate from the management CA. A TLS client without a
//! valid certificate gets the handshake alert and nothing else: no HTTP byte is ever read from
//! an unauthenticated connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tlsgate_keystore::Token;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tower_service::Service;

use super::access::PeerRefused;
use super::closing::ClosingTls;
use super::ApiConfig;
use crate::audit::ClientIdentity;
use crate::config::Config;
use crate::conn_limit::{ConnLimiter, Slot};
use crate::tls::{ServedCert, SniResolver, UnknownSni};

/// How long a client may take to finish its TLS handshake or send a request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one connection with `identity` (and, for a refused peer, [`PeerRefused`]) attached
/// to each request. The connection counts as busy while a request is in progress; hyper's
/// header timeout closes it when it sends no request head (also between requests) in time.
async fn serve_conn<I>(io: I, identity: ClientIdentity, refused: bool, app: Router, mut slot: Slot)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let busy = Arc::new(slot.busy_handle());
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(identity.clone());
        if refused {
            req.extensions_mut().insert(PeerRefused);
        }
        let mut app = app.clone();
        let busy = busy.clone();
        async move {
            let _busy = busy.busy();
            app.call(req).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        _ = &mut slot.evicted => {
            tracing::debug!("management API connection closed to make room for a new one");
        }
        result = conn => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "management API connection ended with an error");
            }
        }
    }
}

/// Accepts on the unix socket until the runtime stops. Every peer's uid and gid are read with
/// SO_PEERCRED; a peer outside `allow` gets `403 peer_not_allowed` (audited) for each request.
pub async fn serve_unix(
    listener: UnixListener,
    app: Router,
    allow: super::PeerAllowlist,
    max_connections: usize,
) {
    let limiter = ConnLimiter::new(max_connections);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (uid, gid) = match stream.peer_cred() {
                    Ok(cred) => (cred.uid(), cred.gid()),
                    Err(err) => {
                        tracing::warn!(error = %err, "management socket: no peer credentials; connection dropped");
                        continue;
                    }
                };
                let Some(slot) = limiter.admit() else {
                    tracing::warn!(
                        uid,
                        "management socket: every connection busy; new one closed"
                    );
                    continue;
                };
                let refused = !allow.allows(uid, gid);
                let identity = if refused {
                    ClientIdentity::Peer { uid, gid }
                } else {
                    ClientIdentity::Uid(uid)
                };
                tokio::spawn(serve_conn(stream, identity, refused, app.clone(), slot));
            }
            Err(err) => {
                tracing::warn!(error = %err, "management socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts HTTPS connections until the runtime stops.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    max_connections: usize,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limiter = ConnLimiter::new(max_connections);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(err) => {
                tracing::warn!(error = %err, "management API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(mut slot) = limiter.admit() else {
            tracing::warn!(%peer, "management API: every connection busy; new one closed");
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let stream = tokio::select! {
                _ = &mut slot.evicted => return,
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(err)) => {
                        tracing::info!(%peer, error = %err, "management API handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "management API handshake not finished in time; connection closed");
                        return;
                    }
                },
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|leaf| cert_identity(leaf.as_ref()));
            match identity {
                Some(id) => serve_conn(ClosingTls::new(stream), id, false, app, slot).await,
                // The verifier requires a certificate, so this does not happen; refuse anyway.
                None => tracing::warn!(%peer, "management API client without a certificate"),
            }
        });
    }
}

/// A client certificate's subject and SHA-256 fingerprint.
pub fn cert_identity(der: &[u8]) -> ClientIdentity {
    use x509_parser::prelude::FromDer;
    let subject = match x509_parser::certificate::X509Certificate::from_der(der) {
        Ok((_, c)) => c.subject().to_string(),
        Err(_) => "unparsable".to_owned(),
    };
    ClientIdentity::Cert {
        subject,
        fingerprint_sha256: hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)),
    }
}

/// The HTTPS server configuration: the API's own certificate, and client certificates required
/// and verified against `client_ca`.
pub fn tls_config(
    api: &ApiConfig,
    config: &Config,
    token: Option<&Arc<Token>>,
) -> Result<Arc<ServerConfig>> {
    let (Some(cert), Some(key), Some(ca)) = (&api.cert, &api.key, &api.client_ca) else {
        anyhow::bail!("[api]: listen needs cert, key and client_ca");
    };
    let ca_path = config.resolve(ca);
    let roots = crate::credential::load_roots(&ca_path).context("[api] client_ca")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, crate::tls::provider())
        .build()
        .context("[api] client_ca: cannot build the client verifier")?;
    let certified = crate::credential::load_credential(
        config,
        "[api]",
        key,
        cert,
        token,
        std::time::SystemTime::now(),
    )?
    .certified_key()
    .context("[api] cert")?;
    let resolver = SniResolver::new(
        [ServedCert {
            key: certified,
            names: Vec::new().into(),
            default: true,
        }]
        .iter(),
        UnknownSni::Default,
    )?;
    let mut tls = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}
