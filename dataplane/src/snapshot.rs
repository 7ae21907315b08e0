//! The immutable state cores use for new connections, and its prepared per-listener form.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;

use crate::keyops::tripwire_config;
use crate::pool::{Pool, RouteTable};

/// Everything that can change on reload. Immutable: a reload publishes a new one.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// One entry per listener; names must match those given at [`crate::start`].
    pub listeners: Vec<ListenerSnapshot>,
}

/// One listener's TLS and routing state.
#[derive(Debug, Clone)]
pub struct ListenerSnapshot {
    /// Unique name (labels metrics and logs).
    pub name: String,
    /// Bind address; only read at start (listener sockets are made once).
    pub bind: SocketAddr,
    /// Server configuration built by the caller.
    pub tls: Arc<ServerConfig>,
    /// The certificate keys are slow (on a token): full handshakes run `into_connection()` on a
    /// key-operation worker instead of the io thread.
    pub offload_key_ops: bool,
    /// Where decrypted bytes go when `routes` is `None` (a one-server pool).
    pub backend: SocketAddr,
    /// Send a PROXY protocol v2 header to the backend first (with the client-certificate
    /// TLVs of [`crate::conn::identity`] when the client presented one).
    pub proxy_protocol: bool,
    /// Refuses ClientHellos by SNI with an `unrecognized_name` alert before rustls sees them;
    /// `None` lets every name through.
    pub sni_filter: Option<SniFilter>,
    /// Re-checks a *resumed* session against the listener's current client authentication: its
    /// client chain against the current trust (a CRL may have revoked it since the session was
    /// made), and a session without a chain against a policy that now requires one; `None` when
    /// the listener does not authenticate clients.
    pub client_cert_check: Option<ClientCertCheck>,
    /// Speak TLS to the backend (after the PROXY header, when that is on); with `routes`, each
    /// pool carries its own instead.
    pub backend_tls: Option<crate::backend_tls::BackendTls>,
    /// Backend pools by SNI and ALPN ([`crate::pool`]); `None`: `backend`, `proxy_protocol` and
    /// `backend_tls` make the one pool.
    pub routes: Option<Arc<RouteTable>>,
    /// Answers ACME `tls-alpn-01` challenges (RFC 8737) on this listener; `None`: no ACME.
    pub acme_tls_alpn: Option<AcmeTlsAlpn>,
}

/// The ALPN protocol of the ACME `tls-alpn-01` challenge (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How a listener answers `tls-alpn-01`: a ClientHello that offers ALPN `acme-tls/1` alone, for a
/// name with a pending challenge, is answered with `tls` (whose resolver presents that name's
/// challenge certificate) and closed after the handshake; no route, no backend, no key
/// operation. The pending names change without a new snapshot (the check reads the ACME
/// client's current challenges), so a challenge is live as soon as it is published.
#[derive(Debug, Clone)]
pub struct AcmeTlsAlpn {
    /// A configuration with `alpn_protocols = ["acme-tls/1"]` and a software challenge key.
    pub tls: Arc<ServerConfig>,
    /// Whether a challenge is pending for this SNI.
    pub pending: SniFilter,
}

impl AcmeTlsAlpn {
    /// The configuration for a ClientHello offering `offered` for `sni`, when it is a
    /// `tls-alpn-01` validation of a pending challenge.
    pub(crate) fn config_for(
        &self,
        sni: Option<&str>,
        offered: Option<&[&[u8]]>,
    ) -> Option<Arc<ServerConfig>> {
        let only_acme = matches!(offered, Some([p]) if *p == ACME_TLS_ALPN);
        (only_acme && sni.is_some() && self.pending.allows(sni)).then(|| self.tls.clone())
    }
}

/// Answers whether a resumed session's client certificate chain (end entity first) is still
/// acceptable, and whether a session resumed *without* one may go on.
#[derive(Clone)]
pub struct ClientCertCheck(Arc<CertCheck>);

/// The check inside a [`ClientCertCheck`]: `None` is a session that carries no client chain.
type CertCheck = dyn Fn(Option<&[rustls_pki_types::CertificateDer<'_>]>) -> bool + Send + Sync;

impl ClientCertCheck {
    /// Wraps a check of presented chains; a session without a chain passes (optional client
    /// authentication).
    pub fn new(
        f: impl Fn(&[rustls_pki_types::CertificateDer<'_>]) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::of_sessions(move |chain| chain.is_none_or(&f))
    }

    /// Wraps a check that also decides on sessions without a chain (`None`): a listener that
    /// requires a client certificate refuses them, since such a session was made under an
    /// earlier, weaker policy.
    pub fn of_sessions(
        f: impl Fn(Option<&[rustls_pki_types::CertificateDer<'_>]>) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(f))
    }

    /// Whether `chain` passes.
    pub fn allows(&self, chain: &[rustls_pki_types::CertificateDer<'_>]) -> bool {
        (self.0)(Some(chain))
    }

    /// Whether a resumed session with this chain (or none) may go on.
    pub fn allows_resumed(&self, chain: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> bool {
        (self.0)(chain)
    }
}

impl fmt::Debug for ClientCertCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientCertCheck")
    }
}

/// Answers whether a listener serves a ClientHello's SNI (`None`: no SNI sent). A `false` ends
/// the handshake with a fatal `unrecognized_name` alert.
#[derive(Clone)]
pub struct SniFilter(Arc<SniCheck>);

/// The check inside a [`SniFilter`].
type SniCheck = dyn Fn(Option<&str>) -> bool + Send + Sync;

impl SniFilter {
    /// Wraps the check.
    pub fn new(f: impl Fn(Option<&str>) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Whether `sni` is served.
    pub fn allows(&self, sni: Option<&str>) -> bool {
        (self.0)(sni)
    }
}

impl fmt::Debug for SniFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SniFilter")
    }
}

/// A listener prepared for the io threads: the caller's config plus, for offloaded listeners, a
/// twin config whose keys refuse to sign (the "tripwire") so a resumption attempt can run inline
/// and only a handshake that really needs a signature goes to a key-op worker.
#[derive(Debug)]
pub(crate) struct PreparedListener {
    pub snap: ListenerSnapshot,
    pub tripwire_tls: Option<Arc<ServerConfig>>,
    /// The listener's routes (a one-pool table for a plain `backend`).
    pub routes: Arc<RouteTable>,
    /// One configuration per protocol a route may answer with: the listener's own with
    /// `alpn_protocols` set to that protocol alone, and its tripwire twin.
    pub alpn_configs: Vec<AlpnConfig>,
}

/// The listener's configuration answering one ALPN protocol.
#[derive(Debug)]
pub(crate) struct AlpnConfig {
    pub protocol: Vec<u8>,
    pub tls: Arc<ServerConfig>,
    pub tripwire_tls: Option<Arc<ServerConfig>>,
}

impl PreparedListener {
    /// The configuration that answers `alpn` (the listener's own for none), and its tripwire.
    pub(crate) fn configs_for(
        &self,
        alpn: Option<&[u8]>,
    ) -> (Arc<ServerConfig>, Option<Arc<ServerConfig>>) {
        if let Some(p) = alpn {
            if let Some(c) = self.alpn_configs.iter().find(|c| c.protocol == p) {
                return (c.tls.clone(), c.tripwire_tls.clone());
            }
        }
        (self.snap.tls.clone(), self.tripwire_tls.clone())
    }
}

/// A snapshot prepared once on the publishing thread, so cores never build configs.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// Indexed like the listener sockets made at start; `None` when the snapshot lacks a listener
    /// (its sockets keep accepting but connections are closed at once and counted).
    pub listeners: Vec<Option<Arc<PreparedListener>>>,
}

impl Prepared {
    pub(crate) fn new(snapshot: &Snapshot, names: &[String]) -> Self {
        let listeners = names
            .iter()
            .map(|name| {
                let snap = snapshot.listeners.iter().find(|l| &l.name == name)?;
                let tripwire_tls = snap.offload_key_ops.then(|| tripwire_config(&snap.tls));
                let routes = snap.routes.clone().unwrap_or_else(|| {
                    let mut pool = Pool::single(&snap.name, snap.backend, Duration::ZERO);
                    pool.proxy_protocol = snap.proxy_protocol;
                    pool.backend_tls = snap.backend_tls.clone();
                    Arc::new(RouteTable::new(Vec::new(), Some(Arc::new(pool))))
                });
                let mut protocols: Vec<Vec<u8>> = Vec::new();
                for pool in routes.pools() {
                    protocols.extend(pool.alpn.iter().cloned());
                }
                protocols.extend(routes.routes.iter().filter_map(|r| r.alpn.clone()));
                protocols.sort();
                protocols.dedup();
                let alpn_configs = protocols
                    .into_iter()
                    .map(|protocol| {
                        let mut cfg = (*snap.tls).clone();
                        cfg.alpn_protocols = vec![protocol.clone()];
                        let tls = Arc::new(cfg);
                        let tripwire_tls = snap.offload_key_ops.then(|| tripwire_config(&tls));
                        AlpnConfig {
                            protocol,
                            tls,
                            tripwire_tls,
                        }
                    })
                    .collect();
                Some(Arc::new(PreparedListener {
                    snap: snap.clone(),
                    tripwire_tls,
                    routes,
                    alpn_configs,
                }))
            })
            .collect();
        Self { listeners }
    }
}
