//! Turning configuration and management state into what the data plane serves: the
//! [`Builder`], used by start-up, reloads, management API changes and OCSP refreshes alike.
//!
//! Certificates named in the configuration file are loaded through
//! [`crate::credential::load_credential`], those of the state directory by the management
//! plane (`api::manager`) with the same keystore [`Credential`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};
use parking_lot::Mutex;
use rustls_pki_types::CertificateRevocationListDer;
use tlsgate_dataplane::{ListenerSnapshot, Snapshot};
use tlsgate_keystore::cert::CertChain;
use tlsgate_keystore::keyref::{KeyBackend, KeyRef, LoadedKey};
use tlsgate_keystore::token::{Token, UnavailableTokenKey};
use tlsgate_keystore::Credential;

use crate::config::Config;
use crate::credential::{key_ref, load_credential};
use crate::mgmt_metrics::Expiry;
use crate::tls::ocsp;
use crate::tls::stapler::Stapler;
use crate::tls::ServedCert;

/// What the management API adds to the configuration file, per listener.
#[derive(Debug, Default)]
pub struct Overlay {
    pub listeners: HashMap<String, ListenerOverlay>,
}

/// One listener's certificates and CRLs from the state directory.
#[derive(Debug, Default)]
pub struct ListenerOverlay {
    /// When bound through the API: the certificates served instead of the file's.
    pub certs: Option<imbl::Vector<BoundServed>>,
    /// The positions of `certs` that may differ from the listener's last committed build (a
    /// rotation: the others are the same certificates); `None` when any may.
    pub changed: Option<Vec<usize>>,
    /// Some bound key is on a token (full handshakes sign on the key-op workers).
    pub offload: bool,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// The client CA bundle (PEM) uploaded for the listener, in place of `client_auth.ca`.
    pub client_ca: Option<Arc<str>>,
    /// Expiry of the bound certificates (same positions as `certs`), for the gauges.
    pub expiry: imbl::Vector<Expiry>,
    /// Certificates served beside the file's or the binding's (issued by the ACME client).
    pub extra: Vec<BoundServed>,
    /// Expiry of `extra`.
    pub extra_expiry: Vec<Expiry>,
}

/// A certificate bound through the API, as the builder staples and serves it.
#[derive(Debug, Clone)]
pub struct BoundServed {
    pub served: ServedCert,
    /// The leaf's SHA-256 (hex): the OCSP cache's key.
    pub fingerprint: Arc<str>,
    pub subject: Arc<str>,
    /// Whether its leaf names an OCSP responder to fetch from (and `[ocsp] api_fetch` is on).
    pub fetch: bool,
    /// Its key is on a token (full handshakes sign on the key-op workers).
    pub on_token: bool,
}

/// Which listeners a build makes anew; the others are taken from the last committed build.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every listener (start, reload).
    All,
    /// Only these (an API change, a new OCSP staple).
    Listeners(&'a BTreeSet<String>),
}

impl Scope<'_> {
    fn has(&self, listener: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Listeners(set) => set.contains(listener),
        }
    }
}

/// One listener as built, kept for the next build.
#[derive(Debug, Clone)]
struct Part {
    snapshot: ListenerSnapshot,
    certs: Certs,
    /// The API-bound certificates and the ACME ones it was built from (the overlay's).
    bound: Option<(imbl::Vector<BoundServed>, Vec<BoundServed>)>,
    /// Its certificates and resolver, which the next build of it updates (`None` without
    /// certificates).
    served: Option<crate::tls::Served>,
}

/// A listener's certificates as served, and what the builder keeps of them.
#[derive(Debug, Clone)]
struct Certs {
    /// Stapled; in preference order (bound, ACME-issued, then the file's).
    served: imbl::Vector<ServedCert>,
    /// The positions that may differ from the last build of the listener (`None`: any may).
    changed: Option<Vec<usize>>,
    /// Same positions as `served`.
    expiry: imbl::Vector<Expiry>,
    /// The certificates it fetches staples for (the stapler's keys).
    fingerprints: Arc<Vec<Arc<str>>>,
    offload: bool,
    awaiting_token: usize,
}

/// A built snapshot, not yet live: [`Builder::commit`] it once it is published.
#[derive(Debug)]
pub struct Built {
    pub snapshot: Snapshot,
    parts: Vec<(String, Arc<Part>)>,
}

/// The one builder of the data plane's snapshot: configuration file + the management API's
/// overlay + the token → listeners with their certificates (and OCSP staples), client-certificate
/// trust, session ticketers and backend TLS. A listener outside the build's [`Scope`] is the
/// one the last committed build made (same `Arc`s: chains, keys, resolvers, ticketers), so a
/// change costs what it touches.
#[derive(Debug)]
pub struct Builder {
    /// The appliance whose state (sessions, backend servers) every build shares.
    appliance: Arc<crate::appliance::Appliance>,
    token: Option<Arc<Token>>,
    stapler: Arc<Stapler>,
    /// Degraded start (no token yet): token keys become stand-ins that refuse at once.
    degraded: Option<Arc<AtomicU64>>,
    last: Mutex<HashMap<String, Arc<Part>>>,
    /// Answers ACME `tls-alpn-01` on the listeners an `[[acme]]` entry names.
    acme_tls_alpn: Mutex<Option<tlsgate_dataplane::AcmeTlsAlpn>>,
}

impl Builder {
    pub fn new(
        appliance: Arc<crate::appliance::Appliance>,
        token: Option<Arc<Token>>,
        stapler: Arc<Stapler>,
        degraded: Option<Arc<AtomicU64>>,
    ) -> Builder {
        Builder {
            appliance,
            token,
            stapler,
            degraded,
            last: Mutex::new(HashMap::new()),
            acme_tls_alpn: Mutex::new(None),
        }
    }

    /// How listeners answer ACME `tls-alpn-01` from the next build on.
    pub fn set_acme_tls_alpn(&self, acme: tlsgate_dataplane::AcmeTlsAlpn) {
        *self.acme_tls_alpn.lock() = Some(acme);
    }

    pub fn appliance(&self) -> &Arc<crate::appliance::Appliance> {
        &self.appliance
    }

    pub fn token(&self) -> Option<&Arc<Token>> {
        self.token.as_ref()
    }

    pub fn stapler(&self) -> &Arc<Stapler> {
        &self.stapler
    }

    /// Builds the snapshot of `config` with `overlay`, checking every certificate it loads
    /// (order, validity, key match) so a bad file fails here and not in a handshake. Listeners
    /// outside `scope` (and known from the last commit) are reused as they are.
    pub fn build(&self, config: &Config, overlay: &Overlay, scope: Scope<'_>) -> Result<Built> {
        let now = SystemTime::now();
        let last = self.last.lock().clone();
        let mut parts = Vec::with_capacity(config.listeners.len());
        for (i, l) in config.listeners.iter().enumerate() {
            let part = match (last.get(&l.name), scope) {
                (Some(p), _) if !scope.has(&l.name) => p.clone(),
                // An API change or a staple: the listener's resolver is updated for the
                // certificates that changed. A reload indexes everything again.
                (prev, Scope::Listeners(_)) => {
                    Arc::new(self.listener(config, i, overlay, now, prev.map(|p| &**p))?)
                }
                (_, Scope::All) => Arc::new(self.listener(config, i, overlay, now, None)?),
            };
            parts.push((l.name.clone(), part));
        }
        let snapshot = Snapshot {
            listeners: parts.iter().map(|(_, p)| p.snapshot.clone()).collect(),
        };
        Ok(Built { snapshot, parts })
    }

    /// Remembers `built` (now live) for the next build, and publishes its gauges (the expiry
    /// gauges of the listeners it made anew).
    pub fn commit(&self, built: &Built) {
        use crate::mgmt_metrics::publish_expiry_change;
        let awaiting: usize = built
            .parts
            .iter()
            .map(|(_, p)| p.certs.awaiting_token)
            .sum();
        metrics::gauge!(crate::mgmt_metrics::CERTIFICATES_AWAITING_TOKEN).set(awaiting as f64);
        let none = imbl::Vector::new();
        let mut last = self.last.lock();
        let mut staples_changed = false;
        for (name, part) in &built.parts {
            let c = &part.certs;
            match last.remove(name) {
                Some(old) if Arc::ptr_eq(&old, part) => {}
                Some(old) => {
                    publish_expiry_change(&old.certs.expiry, &c.expiry, c.changed.as_deref());
                    staples_changed |= !Arc::ptr_eq(&old.certs.fingerprints, &c.fingerprints);
                }
                None => {
                    crate::mgmt_metrics::create_listener_series(name);
                    publish_expiry_change(&none, &c.expiry, None);
                    staples_changed = true;
                }
            }
        }
        // Listeners the configuration no longer has.
        for old in last.values() {
            publish_expiry_change(&old.certs.expiry, &none, None);
            staples_changed = true;
        }
        drop(last);
        // The stapler keeps what is served: a rotated-away certificate is not fetched again.
        if staples_changed {
            let keep: HashSet<&str> = built
                .parts
                .iter()
                .flat_map(|(_, p)| p.certs.fingerprints.iter().map(|f| &**f))
                .collect();
            self.stapler.retain(&keep);
        }
        *self.last.lock() = built.parts.iter().cloned().collect();
    }

    /// Builds and commits: for a caller that publishes whatever builds (start, a reload
    /// without the management API).
    pub fn build_committed(&self, config: &Config, scope: Scope<'_>) -> Result<Snapshot> {
        let built = self.build(config, &Overlay::default(), scope)?;
        self.commit(&built);
        Ok(built.snapshot)
    }

    fn listener(
        &self,
        config: &Config,
        i: usize,
        overlay: &Overlay,
        now: SystemTime,
        prev: Option<&Part>,
    ) -> Result<Part> {
        let token = self.token.as_ref();
        let l = &config.listeners[i];
        let policy = l
            .tls_policy()
            .with_context(|| format!("listener[{i}] ({}).policy", l.name))?;
        let api = overlay.listeners.get(&l.name);
        let patched = match (prev, api) {
            (Some(prev), Some(api)) => self.patched(&l.name, &policy, api, prev, now)?,
            _ => None,
        };
        let certs = match patched {
            Some(certs) => certs,
            None => self.certs(config, i, &policy, api, now)?,
        };
        let uploaded_ca = api.and_then(|o| o.client_ca.as_deref());
        let client_auth = match (&l.client_auth, uploaded_ca) {
            (Some(c), uploaded) => Some(
                crate::tls::client_auth::ClientAuth::load_with(
                    c,
                    |p| config.resolve(p),
                    uploaded,
                )
                .with_context(|| format!("listener[{i}] ({}).client_auth", l.name))?,
            ),
            (None, Some(_)) => anyhow::bail!(
                "listener[{i}] ({}): a client CA bundle is uploaded for it, but its                  configuration has no [listener.client_auth] (mode)",
                l.name
            ),
            (None, None) => None,
        };
        let opts = crate::tls::ListenerTls {
            unknown_sni: l.unknown_sni,
            policy,
            client_auth,
            session: Some(
                self.appliance
                    .sessions
                    .for_listener(&l.name, &l.session, token)?,
            ),
            extra_crls: api.map(|o| o.crls.clone()).unwrap_or_default(),
        };
        let (tls, sni_filter, client_cert_check, served) = if certs.served.is_empty() {
            tracing::warn!(listener = %l.name, "no certificate yet: handshakes are refused until one is bound through the management API");
            (crate::tls::no_certificate_config()?, None, None, None)
        } else {
            let at = || format!("listener {:?}", l.name);
            let list = certs.served.clone();
            let served = match prev.and_then(|p| p.served.as_ref()) {
                Some(prev) => prev.update(list, certs.changed.as_deref(), &opts),
                None => crate::tls::Served::new(list, &opts),
            }
            .with_context(at)?;
            let sni_filter = crate::tls::sni_filter_of(&served, &opts);
            let client_cert_check =
                crate::tls::client_cert_check(&l.name, &opts).with_context(at)?;
            let tls = crate::tls::server_config_of(&served, &opts).with_context(at)?;
            (tls, sni_filter, client_cert_check, Some(served))
        };
        Ok(Part {
            snapshot: ListenerSnapshot {
                name: l.name.clone(),
                bind: l.bind,
                tls,
                offload_key_ops: certs.offload,
                backend: l
                    .backend
                    .unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                proxy_protocol: l.proxy_protocol,
                sni_filter,
                client_cert_check,
                backend_tls: crate::backend_tls::build(config, i, token)?,
                routes: crate::pools::routes(config, i, token, &self.appliance.pools)?,
                acme_tls_alpn: config
                    .acme
                    .iter()
                    .any(|a| {
                        a.challenge == crate::config::acme::ChallengeKind::TlsAlpn01
                            && a.listeners.contains(&l.name)
                    })
                    .then(|| self.acme_tls_alpn.lock().clone())
                    .flatten(),
            },
            certs,
            bound: api.and_then(|o| Some((o.certs.clone()?, o.extra.clone()))),
            served,
        })
    }

    /// A listener's certificates from its last build with only the overlay's `changed`
    /// positions replaced (a rotation), or `None` when the last build cannot be patched: it
    /// had other certificates, other ACME ones, or the overlay was made anew.
    fn patched(
        &self,
        listener: &str,
        policy: &crate::policy::TlsPolicy,
        api: &ListenerOverlay,
        prev: &Part,
        now: SystemTime,
    ) -> Result<Option<Certs>> {
        let (Some(bound), Some(changed), Some((prev_bound, prev_extra))) =
            (&api.certs, &api.changed, &prev.bound)
        else {
            return Ok(None);
        };
        let extra_same = api.extra.len() == prev_extra.len()
            && api.extra.iter().zip(prev_extra).all(|(a, b)| {
                Arc::ptr_eq(&a.served.key, &b.served.key)
                    && a.served.names == b.served.names
                    && a.served.default == b.served.default
                    && a.fetch == b.fetch
            });
        let fits = bound.len() == prev_bound.len()
            && prev.certs.served.len() == bound.len() + api.extra.len()
            && prev.certs.expiry.len() == bound.len() + api.extra_expiry.len();
        if !extra_same || !fits {
            return Ok(None);
        }
        let mut allowed = Vec::new();
        let mut certs = prev.certs.clone();
        let mut refetch = false;
        for &at in changed {
            let (Some(b), Some(was), Some(expiry)) =
                (bound.get(at), prev_bound.get(at), api.expiry.get(at))
            else {
                return Ok(None);
            };
            let key = self.bound_key(listener, policy, &mut allowed, b, now)?;
            certs.served.set(
                at,
                ServedCert {
                    key,
                    ..b.served.clone()
                },
            );
            certs.expiry.set(at, expiry.clone());
            refetch |= b.fetch || was.fetch;
        }
        if refetch {
            certs.fingerprints = Arc::new(
                bound
                    .iter()
                    .chain(&api.extra)
                    .filter(|b| b.fetch)
                    .map(|b| b.fingerprint.clone())
                    .collect(),
            );
        }
        certs.changed = Some(changed.clone());
        certs.offload = api.offload || api.extra.iter().any(|b| b.on_token);
        certs.awaiting_token = 0;
        Ok(Some(certs))
    }

    /// A certificate bound through the API, checked against the listener's policy and stapled.
    /// `allowed` holds the key algorithms already checked for this listener: each is checked
    /// once, not once per certificate.
    fn bound_key(
        &self,
        listener: &str,
        policy: &crate::policy::TlsPolicy,
        allowed: &mut Vec<rustls::SignatureAlgorithm>,
        b: &BoundServed,
        now: SystemTime,
    ) -> Result<Arc<rustls::sign::CertifiedKey>> {
        let alg = b.served.key.key.algorithm();
        if !allowed.contains(&alg) {
            policy
                .check_key(alg)
                .with_context(|| format!("listener {listener:?}: bound certificate"))?;
            allowed.push(alg);
        }
        let source = b.fetch.then_some(ocsp::Source::Fetch);
        self.stapler.staple(
            listener,
            &b.subject,
            &b.fingerprint,
            source.as_ref(),
            b.served.key.clone(),
            now,
        )
    }

    /// A listener's certificates, all loaded (the file's) or taken from the overlay, checked
    /// and stapled.
    fn certs(
        &self,
        config: &Config,
        i: usize,
        policy: &crate::policy::TlsPolicy,
        api: Option<&ListenerOverlay>,
        now: SystemTime,
    ) -> Result<Certs> {
        let token = self.token.as_ref();
        let l = &config.listeners[i];
        let mut served = imbl::Vector::new();
        let mut expiry = imbl::Vector::new();
        let mut fingerprints = Vec::new();
        let mut offload = false;
        let mut awaiting_token = 0usize;
        // Each key algorithm is checked against the policy once, not once per certificate.
        let mut allowed: Vec<rustls::SignatureAlgorithm> = Vec::new();
        let mut add_bound =
            |b: &BoundServed, served: &mut imbl::Vector<ServedCert>| -> Result<()> {
                let key = self.bound_key(&l.name, policy, &mut allowed, b, now)?;
                if b.fetch {
                    fingerprints.push(b.fingerprint.clone());
                }
                served.push_back(ServedCert {
                    key,
                    ..b.served.clone()
                });
                Ok(())
            };
        let file_certs = match api.and_then(|o| o.certs.as_ref()) {
            Some(bound) => {
                expiry.extend(api.iter().flat_map(|o| o.expiry.iter().cloned()));
                offload = api.is_some_and(|o| o.offload);
                for b in bound {
                    add_bound(b, &mut served)?;
                }
                &[][..]
            }
            None => &l.certificates[..],
        };
        if let Some(o) = api {
            for b in &o.extra {
                add_bound(b, &mut served)?;
            }
            expiry.extend(o.extra_expiry.iter().cloned());
            offload |= o.extra.iter().any(|b| b.on_token);
        }
        for (j, c) in file_certs.iter().enumerate() {
            let at = format!("listener[{i}].certificate[{j}] ({})", l.name);
            let key_ref = key_ref(config, &c.key).with_context(|| format!("{at}.key"))?;
            let cred = match (&key_ref, &self.degraded) {
                (KeyRef::Pkcs11(uri), Some(refused)) if token.is_none() => {
                    awaiting_token += 1;
                    tracing::warn!(listener = %l.name, key = %c.key, "token key not loaded yet (degraded start): full handshakes with this certificate are refused until the HSM is reached");
                    stand_in(config, &at, uri, &c.chain, refused, now)?
                }
                _ => load_credential(config, &at, &c.key, &c.chain, token, now)?,
            };
            let report = &cred.report;
            policy
                .check_key(cred.key.signing_key.algorithm())
                .with_context(|| format!("{at}.key: {}", c.key))?;
            tracing::info!(listener = %l.name, subject = %report.subject, sans = ?report.sans, key = %c.key, "certificate loaded");
            let names: Arc<[String]> = match &c.names {
                Some(names) => names.clone().into(),
                None => dns_names(&report.sans).into(),
            };
            expiry.push_back(Expiry {
                listener: l.name.clone(),
                certificate: format!("config:{j}"),
                names: names.clone(),
                not_after: report.not_after,
            });
            let key = cred
                .certified_key_with(|k| crate::mgmt_metrics::timed(k, cred.backend()))
                .with_context(|| at.clone())?;
            let key = self
                .stapler
                .staple(
                    &l.name,
                    &report.subject,
                    &report.fingerprint_sha256,
                    ocsp_source(config, c).as_ref(),
                    key,
                    now,
                )
                .with_context(|| format!("{at}.ocsp"))?;
            if c.ocsp.is_some() || c.ocsp_fetch {
                fingerprints.push(report.fingerprint_sha256.as_str().into());
            }
            served.push_back(ServedCert {
                key,
                names,
                default: c.default,
            });
            offload |= cred.backend() == KeyBackend::Pkcs11;
        }
        Ok(Certs {
            served,
            changed: None,
            expiry,
            fingerprints: Arc::new(fingerprints),
            offload,
            awaiting_token,
        })
    }
}

/// A token key's stand-in while the token is not open (degraded start): the chain is checked
/// against the certificate's own public key; the key match waits for the token.
fn stand_in(
    config: &Config,
    at: &str,
    uri: &tlsgate_keystore::Pkcs11Uri,
    chain: &Path,
    refused: &Arc<AtomicU64>,
    now: SystemTime,
) -> Result<Credential> {
    let chain_path = config.resolve(chain);
    let chain_at = || format!("{at}.chain: {}", chain_path.display());
    let chain = CertChain::from_pem_file(&chain_path).with_context(chain_at)?;
    let spki = chain.leaf_spki().with_context(chain_at)?;
    let label = uri.token.clone().unwrap_or_default();
    let key =
        UnavailableTokenKey::new(&label, &spki, Arc::clone(refused)).with_context(chain_at)?;
    let stand_in = LoadedKey {
        signing_key: Arc::new(key),
        spki_der: spki,
        backend: KeyBackend::Pkcs11,
    };
    Credential::with_key(stand_in, chain, now).with_context(chain_at)
}

/// Where a configured certificate's OCSP response comes from, if anywhere.
fn ocsp_source(config: &Config, c: &crate::config::CertificateConfig) -> Option<ocsp::Source> {
    match (&c.ocsp, c.ocsp_fetch) {
        (Some(p), _) => Some(ocsp::Source::File(config.resolve(p))),
        (None, true) => Some(ocsp::Source::Fetch),
        (None, false) => None,
    }
}

/// The DNS names among a leaf's SANs (IP, e-mail and URI SANs are not SNI names).
pub fn dns_names(sans: &[String]) -> Vec<String> {
    sans.iter()
        .filter(|s| s.parse::<std::net::IpAddr>().is_err())
        .filter_map(|s| crate::tls::normalize_name(s).ok())
        .collect()
}
