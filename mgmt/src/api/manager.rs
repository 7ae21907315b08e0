//! The one authoritative management state: the configuration file, the state directory and the
//! token. Every change is checked by building the complete new snapshot first; only a change
//! that builds is written to the state directory and then published to the data plane, so a
//! change that fails changes nothing. Changes are serialised by one lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use rustls_pki_types::CertificateRevocationListDer;
use serde::{Deserialize, Serialize};
use tlsgate_dataplane::Snapshot;
use tlsgate_keystore::cert::{fmt_time, CertChain, ChainReport};
use tlsgate_keystore::keyref::{self, KeyBackend, KeyRef};
use tlsgate_keystore::secret::SecretBuf;
use tlsgate_keystore::{KeyInfo, KeySpec, Pkcs11Uri, Token};
use zeroize::Zeroizing;

use super::error::{cert_error, key_error, ApiError};
use crate::audit::{AuditLog, ClientIdentity};
use crate::config::Config;
use crate::state::{check_name, Binding, BoundCert, StateData, StateStore, StoredCert, StoredCrl};
use crate::tls::ServedCert;

/// Hands a snapshot to the data plane and returns once new connections use it.
pub type Publisher = Box<dyn Fn(Arc<Snapshot>) + Send + Sync>;

/// What the API adds to the configuration file, per listener.
#[derive(Debug, Default)]
pub struct Overlay {
    pub listeners: HashMap<String, ListenerOverlay>,
}

/// One listener's certificates and CRLs from the state directory.
#[derive(Debug, Default)]
pub struct ListenerOverlay {
    /// When bound through the API: the certificates served instead of the file's.
    pub certs: Option<Vec<ServedCert>>,
    /// Some bound key is on a token (full handshakes sign on the key-op workers).
    pub offload: bool,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Expiry of the bound certificates, for the gauges.
    pub expiry: Vec<crate::mgmt_metrics::Expiry>,
}

/// A certificate as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct CertView {
    pub id: String,
    pub key: String,
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub not_after_unix: i64,
    pub chain_not_after: String,
    pub fingerprint_sha256: String,
    pub chain_length: usize,
    pub updated_unix: u64,
    /// Listeners whose binding names it.
    pub bound_to: Vec<String>,
}

/// A key as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    pub label: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub uri: String,
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
    /// `generated` on the token or `imported`.
    pub origin: String,
    pub spki_sha256: String,
    /// Certificates (state directory ids, or `config:<listener>`) that use it.
    pub used_by: Vec<String>,
}

/// A listener and what it serves.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerView {
    pub name: String,
    /// The address it listens on (the configured one until the data plane has bound it).
    pub bind: String,
    /// How many `[[listener.certificate]]` entries the configuration file gives it.
    pub config_certificates: usize,
    /// `api` when a binding replaces the configuration file's certificates, else `config`.
    pub source: &'static str,
    pub binding: Option<Vec<BoundCert>>,
    pub crls: Vec<CrlView>,
}

/// A CRL as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct CrlView {
    pub id: String,
    pub issuer: String,
    pub this_update: String,
    pub next_update: Option<String>,
    pub revoked: usize,
}

/// Request: generate a key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateKey {
    #[serde(rename = "type")]
    pub kind: String,
    pub label: String,
    /// CKA_ID in hex; random when absent.
    pub id: Option<String>,
}

/// Request: a CSR.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrRequest {
    pub common_name: String,
    #[serde(default)]
    pub sans: Vec<String>,
}

/// Request: upload a certificate chain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutCert {
    /// A key label on the configured token, a `pkcs11:` URI, or `file:PATH`.
    pub key: String,
    pub chain_pem: String,
}

/// Request: bind certificates to a listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutBinding {
    pub certificates: Vec<BoundCert>,
}

/// Request: upload a CRL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutCrl {
    pub pem: String,
}

struct Inner {
    config: Config,
    state: StateData,
}

/// A snapshot and the expiry of every certificate it serves.
type Built = (Snapshot, Vec<crate::mgmt_metrics::Expiry>);

/// The management plane's state and every operation on it.
pub struct Manager {
    inner: Mutex<Inner>,
    /// Listener addresses as bound (port 0 resolved).
    bound: Mutex<HashMap<String, std::net::SocketAddr>>,
    token: Option<Arc<Token>>,
    /// `[pkcs11] call_timeout_ms`, kept outside `inner`: a call stuck on the HSM holds that lock.
    call_timeout: std::time::Duration,
    /// `[api] danger_allow_key_import_over_https`, read at start (outside `inner` likewise).
    key_import_over_https: bool,
    store: StateStore,
    audit: AuditLog,
    publish: Publisher,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("state_dir", &self.store.dir())
            .finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Manager {
    /// Loads the state directory and builds the first snapshot from the configuration file and
    /// the state. The snapshot is returned for the data plane's start; later ones go through
    /// `publish`.
    pub fn start(
        config: Config,
        token: Option<Arc<Token>>,
        store: StateStore,
        audit: AuditLog,
        publish: Publisher,
    ) -> anyhow::Result<(Manager, Snapshot)> {
        let state = store.load()?;
        let call_timeout = config.pkcs11.as_ref().map_or(
            std::time::Duration::from_millis(crate::config::DEFAULT_CALL_TIMEOUT_MS),
            |p| p.call_timeout(),
        );
        let key_import_over_https = config
            .api
            .as_ref()
            .is_some_and(|a| a.danger_allow_key_import_over_https);
        let mgr = Manager {
            inner: Mutex::new(Inner {
                config,
                state: StateData::default(),
            }),
            bound: Mutex::new(HashMap::new()),
            token,
            call_timeout,
            key_import_over_https,
            store,
            audit,
            publish,
        };
        let snapshot = {
            let mut inner = mgr.lock();
            let (snapshot, expiry) = mgr
                .build(&inner.config, &state)
                .map_err(|e| anyhow::anyhow!("the state directory does not load: {e}"))?;
            inner.state = state;
            crate::mgmt_metrics::publish_expiry(&expiry);
            snapshot
        };
        Ok((mgr, snapshot))
    }

    /// Records the addresses the data plane bound, for listings.
    pub fn set_bound(&self, addrs: &[(String, std::net::SocketAddr)]) {
        let mut bound = match self.bound.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        bound.extend(addrs.iter().cloned());
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-changed: every change is
        // committed by one assignment after it was persisted.
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Runs `op` and writes its audit line (for changes that are not API requests: a signal).
    pub fn audited<T>(
        &self,
        client: &ClientIdentity,
        operation: &str,
        target: &str,
        op: impl FnOnce(&Manager) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let result = self.perform(client, operation, target, op);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.code,
        };
        self.audit.record(client, operation, target, outcome);
        result
    }

    /// The audit log (API requests write their line in `api::access`).
    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// Runs `op` and logs it; the API request around it writes the audit line.
    pub fn perform<T>(
        &self,
        client: &ClientIdentity,
        operation: &str,
        target: &str,
        op: impl FnOnce(&Manager) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let result = op(self);
        if let Err(e) = &result {
            tracing::warn!(client = %client, operation, target, code = e.code, message = %e.message, "management operation refused");
        } else {
            tracing::info!(client = %client, operation, target, "management operation");
        }
        result
    }

    /// Whether `POST /v1/keys/import` is served over HTTPS (`[api]
    /// danger_allow_key_import_over_https`); over the unix socket it always is.
    pub fn key_import_over_https(&self) -> bool {
        self.key_import_over_https
    }

    /// How long an API call may take before it answers `hsm_timeout`.
    pub fn call_timeout(&self) -> std::time::Duration {
        self.call_timeout
    }

    fn token(&self) -> Result<&Arc<Token>, ApiError> {
        self.token.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_token",
                "no [pkcs11] token is configured",
            )
        })
    }

    /// Builds the snapshot `config` + `state` would give, checking everything.
    fn build(&self, config: &Config, state: &StateData) -> Result<Built, ApiError> {
        let now = SystemTime::now();
        let mut overlay = Overlay::default();
        for (listener, crls) in &state.crls {
            let entry = overlay.listeners.entry(listener.clone()).or_default();
            for c in crls {
                entry.crls.push(crl_der(&c.pem)?);
            }
        }
        for (listener, binding) in &state.bindings {
            if !config.listeners.iter().any(|l| &l.name == listener) {
                tracing::warn!(
                    listener,
                    "binding for a listener the configuration file does not have; ignored"
                );
                continue;
            }
            let mut served = Vec::with_capacity(binding.certificates.len());
            let mut expiry = Vec::new();
            let mut offload = false;
            for bc in &binding.certificates {
                let stored = state.certs.get(&bc.cert).ok_or_else(|| {
                    ApiError::not_found(
                        "certificate_not_found",
                        format!(
                            "listener {listener:?} binds unknown certificate {:?}",
                            bc.cert
                        ),
                    )
                })?;
                let (loaded, chain, report) = self.check_cert(config, stored, now)?;
                let names = match &bc.names {
                    Some(names) => {
                        let mut out = Vec::with_capacity(names.len());
                        for n in names {
                            let n = crate::tls::normalize_name(n)
                                .map_err(|e| ApiError::invalid("name_invalid", e.to_string()))?;
                            if !covered(&n, &report.sans) {
                                return Err(ApiError::invalid(
                                    "name_not_in_certificate",
                                    format!(
                                        "certificate {:?} does not cover {n:?} (its SANs: {})",
                                        bc.cert,
                                        report.sans.join(", ")
                                    ),
                                ));
                            }
                            out.push(n);
                        }
                        out
                    }
                    None => crate::serve::dns_names(&report.sans),
                };
                expiry.push(crate::mgmt_metrics::Expiry {
                    listener: listener.clone(),
                    certificate: bc.cert.clone(),
                    names: names.clone(),
                    not_after: report.not_after,
                });
                served.push(ServedCert {
                    key: tlsgate_keystore::cert::certified_key(
                        &chain,
                        crate::mgmt_metrics::timed(loaded.signing_key.clone(), loaded.backend),
                    )
                    .map_err(|e| key_error(&e))?,
                    names,
                    default: bc.default,
                });
                offload |= loaded.backend == KeyBackend::Pkcs11;
            }
            if served.is_empty() {
                return Err(ApiError::invalid(
                    "binding_empty",
                    format!("a binding for {listener:?} needs at least one certificate"),
                ));
            }
            let entry = overlay.listeners.entry(listener.clone()).or_default();
            entry.certs = Some(served);
            entry.offload = offload;
            entry.expiry = expiry;
        }
        let mut expiry = Vec::new();
        let snapshot =
            crate::serve::build_snapshot_with(config, self.token.as_ref(), &overlay, &mut expiry)
                .map_err(|e| ApiError::invalid("snapshot_invalid", format!("{e:#}")))?;
        Ok((snapshot, expiry))
    }

    /// Loads a stored certificate's key and checks its chain against it.
    fn check_cert(
        &self,
        config: &Config,
        stored: &StoredCert,
        now: SystemTime,
    ) -> Result<(keyref::LoadedKey, CertChain, ChainReport), ApiError> {
        let key_ref = self.key_ref(config, &stored.key)?;
        let loaded = keyref::load(&key_ref, self.token.as_ref()).map_err(|e| key_error(&e))?;
        let chain = CertChain::from_pem(stored.chain_pem.as_bytes()).map_err(|e| cert_error(&e))?;
        let report = chain
            .validate(&loaded.spki_der, now)
            .map_err(|e| cert_error(&e))?;
        Ok((loaded, chain, report))
    }

    /// A key label on the configured token, a `pkcs11:` URI or `file:PATH`.
    fn key_ref(&self, config: &Config, key: &str) -> Result<KeyRef, ApiError> {
        let bad =
            |e: &dyn std::fmt::Display| ApiError::invalid("key_reference_invalid", e.to_string());
        if key.contains(':') {
            let r: KeyRef = key.parse().map_err(|e| bad(&e))?;
            Ok(match r {
                KeyRef::File(p) => KeyRef::File(config.resolve(&p)),
                other => other,
            })
        } else {
            Ok(KeyRef::Pkcs11(self.label_uri(key)?))
        }
    }

    fn label_uri(&self, label: &str) -> Result<Pkcs11Uri, ApiError> {
        if label.is_empty() {
            return Err(ApiError::bad_request("a key label must not be empty"));
        }
        Ok(Pkcs11Uri {
            token: Some(self.token()?.label().to_owned()),
            object: Some(label.to_owned()),
            object_type: Some(tlsgate_keystore::ObjectType::Private),
            ..Default::default()
        })
    }

    /// Checks `new_state` by building its snapshot, runs `persist`, then commits and publishes.
    fn change(
        &self,
        inner: &mut Inner,
        new_state: StateData,
        persist: impl FnOnce(&StateStore) -> anyhow::Result<()>,
    ) -> Result<(), ApiError> {
        let (snapshot, expiry) = self.build(&inner.config, &new_state)?;
        persist(&self.store).map_err(|e| ApiError::state_write(&e))?;
        inner.state = new_state;
        (self.publish)(Arc::new(snapshot));
        crate::mgmt_metrics::publish_expiry(&expiry);
        Ok(())
    }

    // ---- keys ----

    pub fn list_keys(&self) -> Result<Vec<KeyView>, ApiError> {
        let token = self.token()?;
        let keys = token.list().map_err(|e| key_error(&e))?;
        let inner = self.lock();
        Ok(keys
            .iter()
            .map(|k| self.key_view(&inner, k, token.label()))
            .collect())
    }

    fn key_view(&self, inner: &Inner, k: &KeyInfo, token: &str) -> KeyView {
        KeyView {
            label: k.label.clone(),
            id: hex::encode(&k.id),
            kind: k.kind.to_string(),
            uri: k.uri(token).to_string(),
            sensitive: k.sensitive,
            extractable: k.extractable,
            always_sensitive: k.always_sensitive,
            never_extractable: k.never_extractable,
            origin: k.origin.to_string(),
            spki_sha256: k.fingerprint_sha256(),
            used_by: self.key_users(inner, &k.label, false),
        }
    }

    /// Certificates that use the key labelled `label`: stored ones (all, or only those a
    /// binding names) and the configuration file's.
    fn key_users(&self, inner: &Inner, label: &str, bound_only: bool) -> Vec<String> {
        let names_label = |key: &str| -> bool {
            match self.key_ref(&inner.config, key) {
                Ok(KeyRef::Pkcs11(uri)) => uri.object.as_deref() == Some(label),
                _ => false,
            }
        };
        let mut users: Vec<String> = inner
            .state
            .certs
            .values()
            .filter(|c| names_label(&c.key))
            .filter(|c| !bound_only || !inner.state.listeners_using(&c.id).is_empty())
            .map(|c| c.id.clone())
            .collect();
        for l in &inner.config.listeners {
            if inner.state.bindings.contains_key(&l.name) && bound_only {
                continue;
            }
            if l.certificates.iter().any(|c| names_label(&c.key)) {
                users.push(format!("config:{}", l.name));
            }
        }
        users
    }

    pub fn generate_key(&self, req: &GenerateKey) -> Result<KeyView, ApiError> {
        let token = self.token()?;
        let spec: KeySpec = req.kind.parse().map_err(|e: tlsgate_keystore::Error| {
            ApiError::invalid("key_type_invalid", e.to_string())
        })?;
        check_label(&req.label)?;
        let id = parse_id(req.id.as_deref())?;
        let info = token
            .generate(spec, &req.label, id.as_deref())
            .map_err(|e| key_error(&e))?;
        let inner = self.lock();
        Ok(self.key_view(&inner, &info, token.label()))
    }

    /// Imports a PKCS#8 key (PEM). The PEM and the DER decoded from it live only in secret
    /// memory (wiped, out of core dumps) and are never stored or echoed.
    pub fn import_key(
        &self,
        label: &str,
        id: Option<&str>,
        pkcs8_pem: &SecretBuf,
    ) -> Result<KeyView, ApiError> {
        let token = self.token()?;
        check_label(label)?;
        let id = parse_id(id)?;
        let der = tlsgate_keystore::secret::pkcs8_der_from_pem(pkcs8_pem.as_bytes())
            .map(|d| Zeroizing::new(d.as_bytes().to_vec()))
            .ok_or_else(|| {
                ApiError::invalid(
                    "key_pem_invalid",
                    "pkcs8_pem holds no PKCS#8 private key (a `-----BEGIN PRIVATE KEY-----` block)",
                )
            })?;
        let info = token
            .import_pkcs8(der, label, id.as_deref())
            .map_err(|e| key_error(&e))?;
        let inner = self.lock();
        Ok(self.key_view(&inner, &info, token.label()))
    }

    pub fn delete_key(&self, label: &str) -> Result<(), ApiError> {
        let token = self.token()?;
        let uri = self.label_uri(label)?;
        // Held across the delete so no binding can start using the key meanwhile.
        let inner = self.lock();
        let users = self.key_users(&inner, label, true);
        if !users.is_empty() {
            return Err(ApiError::conflict(
                "key_in_use",
                format!(
                    "key {label:?} is used by bound certificates: {}; unbind them first",
                    users.join(", ")
                ),
            ));
        }
        token.delete(&uri).map_err(|e| key_error(&e))
    }

    pub fn csr(&self, label: &str, req: &CsrRequest) -> Result<String, ApiError> {
        let token = self.token()?;
        let uri = self.label_uri(label)?;
        if req.common_name.is_empty() {
            return Err(ApiError::bad_request("common_name must not be empty"));
        }
        let key = token.rcgen_key(&uri).map_err(|e| key_error(&e))?;
        tlsgate_keystore::csr::create_csr(&key, &req.common_name, &req.sans)
            .map_err(|e| key_error(&e))
    }

    // ---- certificates ----

    pub fn list_certs(&self) -> Vec<Result<CertView, (String, ApiError)>> {
        let inner = self.lock();
        let now = SystemTime::now();
        inner
            .state
            .certs
            .values()
            .map(|c| {
                self.cert_view(&inner, c, now)
                    .map_err(|e| (c.id.clone(), e))
            })
            .collect()
    }

    pub fn get_cert(&self, id: &str) -> Result<CertView, ApiError> {
        let inner = self.lock();
        let c = inner
            .state
            .certs
            .get(id)
            .ok_or_else(|| cert_not_found(id))?;
        self.cert_view(&inner, c, SystemTime::now())
    }

    fn cert_view(
        &self,
        inner: &Inner,
        c: &StoredCert,
        now: SystemTime,
    ) -> Result<CertView, ApiError> {
        let (_, chain, r) = self.check_cert(&inner.config, c, now)?;
        Ok(cert_view(
            c,
            &r,
            chain.certs.len(),
            inner.state.listeners_using(&c.id),
        ))
    }

    /// Stores (or replaces: a rotation when bound) a certificate chain.
    pub fn put_cert(&self, id: &str, req: PutCert) -> Result<CertView, ApiError> {
        check_name("certificate", id)
            .map_err(|e| ApiError::invalid("name_invalid", format!("{e:#}")))?;
        let mut inner = self.lock();
        let stored = StoredCert {
            id: id.to_owned(),
            key: req.key,
            chain_pem: req.chain_pem,
            updated_unix: now_unix(),
        };
        // Checked on its own first so the answer names the certificate problem even when the
        // certificate is not bound.
        let (_, chain, report) = self.check_cert(&inner.config, &stored, SystemTime::now())?;
        // Store a normalised chain: only the CERTIFICATE blocks.
        let stored = StoredCert {
            chain_pem: chain.to_pem(),
            ..stored
        };
        let mut new_state = inner.state.clone();
        new_state.certs.insert(id.to_owned(), stored.clone());
        self.change(&mut inner, new_state, |s| s.put_cert(&stored))?;
        Ok(cert_view(
            &stored,
            &report,
            chain.certs.len(),
            inner.state.listeners_using(id),
        ))
    }

    pub fn delete_cert(&self, id: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if !inner.state.certs.contains_key(id) {
            return Err(cert_not_found(id));
        }
        let users = inner.state.listeners_using(id);
        if !users.is_empty() {
            return Err(ApiError::conflict(
                "certificate_in_use",
                format!(
                    "certificate {id:?} is bound to listeners {}; change their bindings first",
                    users.join(", ")
                ),
            ));
        }
        let mut new_state = inner.state.clone();
        new_state.certs.remove(id);
        self.change(&mut inner, new_state, |s| s.delete_cert(id))
    }

    // ---- listeners, bindings, CRLs ----

    fn check_listener(inner: &Inner, listener: &str) -> Result<(), ApiError> {
        if inner.config.listeners.iter().any(|l| l.name == listener) {
            Ok(())
        } else {
            Err(ApiError::not_found(
                "listener_not_found",
                format!("no listener {listener:?} in the configuration file"),
            ))
        }
    }

    pub fn list_listeners(&self) -> Vec<ListenerView> {
        let bound = match self.bound.lock() {
            Ok(b) => b.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let inner = self.lock();
        inner
            .config
            .listeners
            .iter()
            .map(|l| {
                let binding = inner
                    .state
                    .bindings
                    .get(&l.name)
                    .map(|b| b.certificates.clone());
                ListenerView {
                    name: l.name.clone(),
                    bind: bound.get(&l.name).unwrap_or(&l.bind).to_string(),
                    config_certificates: l.certificates.len(),
                    source: if binding.is_some() { "api" } else { "config" },
                    binding,
                    crls: inner
                        .state
                        .crls
                        .get(&l.name)
                        .map(|v| v.iter().filter_map(|c| crl_view(c).ok()).collect())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    pub fn put_binding(&self, listener: &str, req: PutBinding) -> Result<(), ApiError> {
        let mut inner = self.lock();
        Self::check_listener(&inner, listener)?;
        if req.certificates.is_empty() {
            return Err(ApiError::invalid(
                "binding_empty",
                "a binding needs at least one certificate; DELETE the binding to serve the configuration file's certificates again",
            ));
        }
        for c in &req.certificates {
            if !inner.state.certs.contains_key(&c.cert) {
                return Err(cert_not_found(&c.cert));
            }
        }
        let binding = Binding {
            listener: listener.to_owned(),
            certificates: req.certificates,
        };
        let mut new_state = inner.state.clone();
        new_state
            .bindings
            .insert(listener.to_owned(), binding.clone());
        self.change(&mut inner, new_state, |s| s.put_binding(&binding))
    }

    pub fn delete_binding(&self, listener: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        Self::check_listener(&inner, listener)?;
        if !inner.state.bindings.contains_key(listener) {
            return Err(ApiError::not_found(
                "binding_not_found",
                format!("listener {listener:?} has no binding"),
            ));
        }
        let mut new_state = inner.state.clone();
        new_state.bindings.remove(listener);
        self.change(&mut inner, new_state, |s| s.delete_binding(listener))
    }

    pub fn put_crl(&self, listener: &str, req: &PutCrl) -> Result<CrlView, ApiError> {
        let mut inner = self.lock();
        Self::check_listener(&inner, listener)?;
        let der = crl_der(&req.pem)?;
        let id = hex::encode(sha256(der.as_ref()))[..16].to_owned();
        let stored = StoredCrl {
            id: id.clone(),
            pem: pem_encode_crl(der.as_ref()),
        };
        let view = crl_view(&stored)?;
        let mut new_state = inner.state.clone();
        let list = new_state.crls.entry(listener.to_owned()).or_default();
        list.retain(|c| c.id != id);
        list.push(stored);
        let list = list.clone();
        self.change(&mut inner, new_state, |s| s.put_crls(listener, &list))?;
        Ok(view)
    }

    pub fn delete_crl(&self, listener: &str, id: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        Self::check_listener(&inner, listener)?;
        let mut new_state = inner.state.clone();
        let list = new_state.crls.entry(listener.to_owned()).or_default();
        let before = list.len();
        list.retain(|c| c.id != id);
        if list.len() == before {
            return Err(ApiError::not_found(
                "crl_not_found",
                format!("listener {listener:?} has no CRL {id:?}"),
            ));
        }
        let list = list.clone();
        if list.is_empty() {
            new_state.crls.remove(listener);
        }
        self.change(&mut inner, new_state, |s| s.put_crls(listener, &list))
    }

    // ---- reload ----

    /// Re-reads the configuration file and publishes it merged with the state directory.
    /// Listener addresses, cores and the token stay as they were at start.
    pub fn reload(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let path = inner.config.path.clone();
        let config =
            Config::load(&path).map_err(|e| ApiError::invalid("config_invalid", e.to_string()))?;
        let (snapshot, expiry) = self.build(&config, &inner.state)?;
        inner.config = config;
        (self.publish)(Arc::new(snapshot));
        crate::mgmt_metrics::publish_expiry(&expiry);
        Ok(())
    }
}

fn cert_not_found(id: &str) -> ApiError {
    ApiError::not_found("certificate_not_found", format!("no certificate {id:?}"))
}

fn cert_view(c: &StoredCert, r: &ChainReport, len: usize, bound_to: Vec<String>) -> CertView {
    CertView {
        id: c.id.clone(),
        key: c.key.clone(),
        subject: r.subject.clone(),
        issuer: r.issuer.clone(),
        sans: r.sans.clone(),
        serial: r.serial_hex.clone(),
        not_before: fmt_time(r.not_before),
        not_after: fmt_time(r.not_after),
        not_after_unix: unix(r.not_after),
        chain_not_after: fmt_time(r.chain_not_after),
        fingerprint_sha256: r.fingerprint_sha256.clone(),
        chain_length: len,
        updated_unix: c.updated_unix,
        bound_to,
    }
}

/// Whether a SAN list covers the (normalised) name: an equal DNS SAN, or a `*.` SAN one label up.
fn covered(name: &str, sans: &[String]) -> bool {
    sans.iter().any(|s| {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        if s == name {
            return true;
        }
        match (s.strip_prefix("*."), name.split_once('.')) {
            (Some(base), Some((_, parent))) => base == parent && !name.starts_with("*."),
            _ => false,
        }
    })
}

pub(crate) fn check_label(label: &str) -> Result<(), ApiError> {
    if label.is_empty() || label.len() > 64 || label.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid(
            "label_invalid",
            "a key label needs 1 to 64 printable characters",
        ));
    }
    Ok(())
}

pub(crate) fn parse_id(id: Option<&str>) -> Result<Option<Vec<u8>>, ApiError> {
    match id {
        None => Ok(None),
        Some(h) => match hex::decode(h) {
            Ok(b) if !b.is_empty() => Ok(Some(b)),
            _ => Err(ApiError::invalid(
                "key_id_invalid",
                format!("id {h:?} is not non-empty hex (e.g. \"01a2\")"),
            )),
        },
    }
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// Parses a CRL (PEM, one block) and checks it is a well-formed X.509 CRL.
pub(crate) fn crl_der(pem: &str) -> Result<CertificateRevocationListDer<'static>, ApiError> {
    use rustls_pki_types::pem::PemObject;
    let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
        ApiError::invalid(
            "crl_pem_invalid",
            "expected one `-----BEGIN X509 CRL-----` block",
        )
    })?;
    use x509_parser::prelude::FromDer;
    match x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref()) {
        Ok(([], _)) => Ok(der),
        Ok(_) => Err(ApiError::invalid(
            "crl_invalid",
            "trailing bytes after the CRL",
        )),
        Err(e) => Err(ApiError::invalid(
            "crl_invalid",
            format!("the CRL does not parse: {e}"),
        )),
    }
}

pub(crate) fn crl_view(c: &StoredCrl) -> Result<CrlView, ApiError> {
    use x509_parser::prelude::FromDer;
    let der = crl_der(&c.pem)?;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
        .map_err(|e| ApiError::invalid("crl_invalid", e.to_string()))?;
    let t = |t: x509_parser::time::ASN1Time| {
        fmt_time(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64),
        )
    };
    Ok(CrlView {
        id: c.id.clone(),
        issuer: crl.issuer().to_string(),
        this_update: t(crl.last_update()),
        next_update: crl.next_update().map(t),
        revoked: crl.iter_revoked_certificates().count(),
    })
}

pub(crate) fn pem_encode_crl(der: &[u8]) -> String {
    tlsgate_keystore::keyinfo::pem_encode("X509 CRL", der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_coverage() {
        let sans = vec!["www.example.com".to_owned(), "*.api.example.com".to_owned()];
        assert!(covered("www.example.com", &sans));
        assert!(covered("v1.api.example.com", &sans));
        assert!(!covered("api.example.com", &sans));
        assert!(!covered("a.b.api.example.com", &sans));
        assert!(!covered("other.example.com", &sans));
    }

    /// Uploaded PEM/DER is attacker-controlled as far as the parser is concerned: truncations
    /// and bit flips of a real certificate and CRL must give errors, never panics.
    #[test]
    fn mangled_uploads_are_errors_not_panics() -> Result<(), Box<dyn std::error::Error>> {
        use rcgen::{CertificateParams, CertificateRevocationListParams, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["a.example".to_owned()])?;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.clone().self_signed(&key)?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let now = time::OffsetDateTime::now_utc();
        let crl = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&Issuer::new(params, &key))?;
        let cert_der = cert.der().to_vec();
        let crl_der_bytes = crl.der().to_vec();
        assert!(CertChain::from_der(vec![cert_der.clone().into()])
            .and_then(|c| c.validate(&spki, SystemTime::now()))
            .is_ok());
        assert!(crl_der(&pem_encode_crl(&crl_der_bytes)).is_ok());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            for original in [&cert_der, &crl_der_bytes] {
                let mut bytes = original.clone();
                if round % 3 == 0 {
                    bytes.truncate((next() as usize) % bytes.len());
                } else {
                    for _ in 0..1 + round % 4 {
                        let i = (next() as usize) % bytes.len();
                        bytes[i] ^= 1 << (next() % 8);
                    }
                }
                if let Ok(chain) = CertChain::from_der(vec![bytes.clone().into()]) {
                    let _ = chain.validate(&spki, SystemTime::now());
                }
                let _ = crl_der(&pem_encode_crl(&bytes));
                let _ = crl_view(&StoredCrl {
                    id: "x".into(),
                    pem: pem_encode_crl(&bytes),
                });
                let text = String::from_utf8_lossy(&bytes);
                let _ = CertChain::from_pem(text.as_bytes());
            }
        }
        Ok(())
    }

    #[test]
    fn crl_ids_are_sha256_prefixes() {
        // SHA-256("") = e3b0c442...
        assert_eq!(hex::encode(sha256(b"")).get(..8), Some("e3b0c442"));
    }
}
