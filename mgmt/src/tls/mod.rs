//! Builds the rustls server configurations from a listener's policy profile
//! ([`crate::tls::policy`], the one place that assembles a `CryptoProvider`), certificates and
//! client-certificate settings ([`crate::tls::client_auth`]).
//!
//! A listener serves [`ServedCert`]s: each answers for a set of names (exact or `*.` wildcard),
//! and those marked `default` answer a client that sends no SNI or a name nobody serves. Within
//! one name, the first certificate whose key can sign with a scheme the client offered wins, so
//! an ECDSA and an RSA certificate can serve the same name side by side.

pub mod client_auth;
pub mod ocsp;
pub mod policy;
pub mod session;
pub mod stapler;

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// Errors while assembling a server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the provider or protocol versions.
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate settings cannot be used.
    #[error(transparent)]
    ClientAuth(#[from] crate::tls::client_auth::ClientAuthError),
    /// No certificate can answer a client that sends no (or an unknown) name.
    #[error("no default certificate: mark one certificate `default = true` or serve only one")]
    NoDefault,
    /// A name is not a DNS name or a `*.` wildcard of one.
    #[error("{0:?} is not a DNS name or a `*.`-prefixed wildcard")]
    BadName(String),
}

/// One certificate as a listener serves it.
#[derive(Debug, Clone)]
pub struct ServedCert {
    /// The chain and its (token or software) key.
    pub key: Arc<CertifiedKey>,
    /// DNS names (lower case; `*.example.com` matches exactly one more label) this certificate
    /// answers for. Usually the leaf's DNS SANs.
    pub names: Arc<[String]>,
    /// Answers clients without SNI, and with unknown SNI unless the listener refuses those.
    pub default: bool,
}

/// What a listener does with a ClientHello whose SNI no certificate serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    /// Serve the default certificate(s).
    #[default]
    Default,
    /// End the handshake with an `unrecognized_name` alert.
    Refuse,
}

/// Per-listener TLS settings beyond the certificates.
#[derive(Debug, Clone, Default)]
pub struct ListenerTls {
    /// Unknown SNI handling.
    pub unknown_sni: UnknownSni,
    /// CRLs uploaded through the management API for this listener, checked (with the config
    /// file's CRLs) when the listener verifies client certificates.
    pub extra_crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    /// Versions, suites and groups (`intermediate` by default).
    pub policy: crate::tls::policy::TlsPolicy,
    /// Client-certificate authentication; none when absent.
    pub client_auth: Option<crate::tls::client_auth::ClientAuth>,
    /// Session tickets and cache (`crate::tls::session`); `None` leaves rustls's defaults.
    pub session: Option<Arc<crate::tls::session::ListenerSessions>>,
}

/// The crypto provider of the default (`intermediate`) policy.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    crate::tls::policy::TlsPolicy::default().provider()
}

/// The data plane's check for `unknown_sni = "refuse"`: answers whether a ClientHello's SNI is
/// served, so the handshake of an unknown name ends with `unrecognized_name`. `None` when the
/// listener serves every name (with its defaults).
pub fn sni_filter(
    certs: &[ServedCert],
    opts: &ListenerTls,
) -> Result<Option<tlsgate_dataplane::SniFilter>, TlsConfigError> {
    if opts.unknown_sni == UnknownSni::Default {
        return Ok(None);
    }
    let mut certs = certs.to_vec();
    if !certs.iter().any(|c| c.default) {
        for c in &mut certs {
            c.default = true;
        }
    }
    let resolver = SniResolver::new(certs, opts.unknown_sni)?;
    Ok(Some(tlsgate_dataplane::SniFilter::new(move |sni| {
        resolver.knows(sni)
    })))
}

/// The data plane's re-check of a resumed session of `listener`: its client certificate
/// against the current CA bundle and CRLs, and a session without one against a `required` mode
/// (`None` without client authentication). Each refusal is counted and logged
/// ([`crate::tls::session::policy::refused`]).
pub fn client_cert_check(
    listener: &str,
    opts: &ListenerTls,
) -> Result<Option<tlsgate_dataplane::ClientCertCheck>, TlsConfigError> {
    use crate::tls::session::policy::{refused, Refusal};
    let Some(auth) = &opts.client_auth else {
        return Ok(None);
    };
    let verifier = auth.verifier(opts.policy.provider(), &opts.extra_crls)?;
    let required = auth.mode == crate::tls::client_auth::ClientAuthMode::Required;
    let listener = listener.to_owned();
    Ok(Some(tlsgate_dataplane::ClientCertCheck::of_sessions(
        move |chain| {
            let (ok, reason) = match chain {
                None => (!required, Refusal::NoClientCertificate),
                Some(chain) => (
                    chain
                        .split_first()
                        .is_some_and(|(end_entity, intermediates)| {
                            verifier
                                .verify_client_cert(
                                    end_entity,
                                    intermediates,
                                    rustls_pki_types::UnixTime::now(),
                                )
                                .is_ok()
                        }),
                    Refusal::ClientCertificateRejected,
                ),
            };
            if !ok {
                refused(&listener, reason);
            }
            ok
        },
    )))
}

/// A server configuration serving `certs` under `opts.policy`. When none is marked default, all
/// are (the order still sets the preference).
pub fn server_config(
    mut certs: Vec<ServedCert>,
    opts: &ListenerTls,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    if !certs.iter().any(|c| c.default) {
        for c in &mut certs {
            c.default = true;
        }
    }
    let provider = opts.policy.provider();
    let resolver = SniResolver::new(certs, opts.unknown_sni)?.with_suites(&provider.cipher_suites);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(opts.policy.versions())?;
    let builder = match &opts.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => builder.with_client_cert_verifier(auth.verifier(provider, &opts.extra_crls)?),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.ignore_client_order = false;
    if let Some(s) = &opts.session {
        s.apply(
            &mut config,
            crate::tls::client_auth::ClientAuth::policy_of(opts.client_auth.as_ref()),
        );
    }
    Ok(Arc::new(config))
}

/// The configuration of a listener with no certificate yet (no `[[listener.certificate]]` and no
/// binding): every handshake ends with a `handshake_failure` alert.
pub fn no_certificate_config() -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    #[derive(Debug)]
    struct NoCertificate;
    impl rustls::server::ResolvesServerCert for NoCertificate {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Ok(Arc::new(config))
}

/// Normalises a configured name: lower case, no trailing dot; `*.` only as the whole first label.
pub fn normalize_name(name: &str) -> Result<String, TlsConfigError> {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    let rest = n.strip_prefix("*.").unwrap_or(&n);
    let ok = !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(n)
    } else {
        Err(TlsConfigError::BadName(name.to_owned()))
    }
}

/// Chooses a certificate by SNI, then by the client's signature schemes.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    defaults: Vec<Arc<CertifiedKey>>,
    unknown: UnknownSni,
    /// The listener's suites, to tell whether a TLS 1.2 client can use a certificate's key type.
    suites: Vec<rustls::SupportedCipherSuite>,
    /// ECDSA certificates (by `Arc` address): the curve of their key (see
    /// [`SniResolver::resolve`]).
    ecdsa: HashMap<usize, rustls::NamedGroup>,
}

/// The named curve of an ECDSA leaf's key, from the curve OID in its SubjectPublicKeyInfo (the
/// only curve OID a certificate holds; its signature names a hash, not a curve).
fn ecdsa_curve(key: &CertifiedKey) -> Option<rustls::NamedGroup> {
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    if key.key.algorithm() != rustls::SignatureAlgorithm::ECDSA {
        return None;
    }
    let leaf = key.end_entity_cert().ok()?;
    // Testing the first two bytes keeps the slice comparison (a `memcmp` call) off all but a few
    // windows: it ran for every window of every bound leaf on each rebuild.
    let has = |oid: &[u8]| {
        leaf.windows(oid.len())
            .any(|w| w[0] == oid[0] && w[1] == oid[1] && w == oid)
    };
    if has(P256) {
        Some(rustls::NamedGroup::secp256r1)
    } else if has(P384) {
        Some(rustls::NamedGroup::secp384r1)
    } else {
        None
    }
}

/// A key of no algorithm any cipher suite can use: rustls then finds no TLS 1.2 suite in
/// common and ends the handshake with `handshake_failure`, the answer for a client that cannot
/// verify our key (as HAProxy answers). It never signs.
#[derive(Debug)]
struct NoUsableScheme;

impl rustls::sign::SigningKey for NoUsableScheme {
    fn choose_scheme(
        &self,
        _offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        None
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::Unknown(0xff)
    }
}

impl SniResolver {
    /// Indexes `certs`; at least one must be `default` (see [`server_config`]).
    pub fn new(certs: Vec<ServedCert>, unknown: UnknownSni) -> Result<Self, TlsConfigError> {
        let mut exact: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut defaults = Vec::new();
        for c in certs {
            for name in c.names.iter() {
                let n = normalize_name(name)?;
                match n.strip_prefix("*.") {
                    Some(base) => wildcard.entry(base.to_owned()).or_default(),
                    None => exact.entry(n).or_default(),
                }
                .push(c.key.clone());
            }
            if c.default {
                defaults.push(c.key);
            }
        }
        if defaults.is_empty() {
            return Err(TlsConfigError::NoDefault);
        }
        let mut ecdsa = HashMap::new();
        for key in exact
            .values()
            .chain(wildcard.values())
            .flatten()
            .chain(&defaults)
        {
            if let Some(curve) = ecdsa_curve(key) {
                ecdsa.insert(Arc::as_ptr(key) as usize, curve);
            }
        }
        Ok(Self {
            exact,
            wildcard,
            defaults,
            unknown,
            suites: Vec::new(),
            ecdsa,
        })
    }

    /// Tells the resolver the listener's cipher suites: a certificate is then preferred only
    /// when the client also offers a suite that can use its key (a TLS 1.2 client offering
    /// ECDSA signatures but only ECDHE-RSA suites gets the RSA certificate).
    pub fn with_suites(mut self, suites: &[rustls::SupportedCipherSuite]) -> Self {
        self.suites = suites.to_vec();
        self
    }

    fn suite_fits(&self, key: &CertifiedKey, client_suites: &[rustls::CipherSuite]) -> bool {
        let alg = key.key.algorithm();
        self.suites.is_empty()
            || self.suites.iter().any(|s| {
                client_suites.contains(&s.suite()) && s.usable_for_signature_algorithm(alg)
            })
    }

    /// Whether a TLS 1.2 client can verify this key's signature: an ECDSA key's curve must be
    /// among the client's supported groups (RFC 8422 §5.1; without the extension any curve
    /// goes). A client that can negotiate TLS 1.3 here is not held to it: there the signature
    /// scheme names the curve, and `choose_scheme` checks that.
    fn curve_fits(&self, key: &Arc<CertifiedKey>, hello: &ClientHello<'_>) -> bool {
        let Some(curve) = self.ecdsa.get(&(Arc::as_ptr(key) as usize)) else {
            return true;
        };
        let tls13 = hello.cipher_suites().iter().any(|c| {
            self.suites
                .iter()
                .any(|s| s.suite() == *c && s.version() == &rustls::version::TLS13)
        });
        if tls13 {
            return true;
        }
        hello
            .named_groups()
            .is_none_or(|groups| groups.contains(curve))
    }

    /// The certificates that serve `sni`, or `None` when no certificate names it.
    fn named(&self, sni: &str) -> Option<&[Arc<CertifiedKey>]> {
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        if let Some(v) = self.exact.get(&sni) {
            return Some(v);
        }
        let (_, parent) = sni.split_once('.')?;
        self.wildcard.get(parent).map(Vec::as_slice)
    }

    /// Whether a ClientHello with this SNI gets a certificate (the data plane refuses the others
    /// with `unrecognized_name` before rustls sees them).
    pub fn knows(&self, sni: Option<&str>) -> bool {
        match sni {
            None => true,
            Some(name) => self.named(name).is_some() || self.unknown == UnknownSni::Default,
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.signature_schemes();
        let candidates = match hello.server_name() {
            None => &self.defaults[..],
            Some(name) => match (self.named(name), self.unknown) {
                (Some(c), _) => c,
                (None, UnknownSni::Default) => &self.defaults[..],
                (None, UnknownSni::Refuse) => return None,
            },
        };
        let client_suites = hello.cipher_suites();
        let signs = |c: &&Arc<CertifiedKey>| {
            c.key.choose_scheme(offered).is_some() && self.curve_fits(c, &hello)
        };
        let chosen = candidates
            .iter()
            .filter(signs)
            .find(|c| self.suite_fits(c, client_suites))
            .or_else(|| candidates.iter().find(signs))
            // Nothing the client can use: hand rustls the first certificate anyway so the
            // client gets handshake_failure (no common signature scheme or suite), the alert
            // scanners and clients expect, rather than access_denied for "no certificate".
            .or_else(|| candidates.first())?;
        // An ECDSA key on a curve the TLS 1.2 client does not support: a twin of it that no
        // suite can use, so rustls answers handshake_failure instead of a signature the client
        // must reject ("wrong curve"). Made here, on that rare path, not for every certificate.
        if !self.curve_fits(chosen, &hello) {
            return Some(Arc::new(CertifiedKey::new(
                chosen.cert.clone(),
                Arc::new(NoUsableScheme),
            )));
        }
        Some(chosen.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_and_checked() {
        assert_eq!(
            normalize_name("WWW.Example.com.").expect("ok"),
            "www.example.com"
        );
        assert_eq!(
            normalize_name("*.example.com").expect("ok"),
            "*.example.com"
        );
        for bad in ["", "*.", "a..b", "*.*.x", "a b", "x.*.y"] {
            assert!(normalize_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
