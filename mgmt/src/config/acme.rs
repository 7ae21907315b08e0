//! `[[acme]]` and `[acme_http01]`: certificates issued and renewed by an ACME CA (RFC 8555,
//! see [`crate::acme`]).
//!
//! ```toml
//! [[acme]]
//! name = "www"                                   # state file, metrics label, `ctl acme renew NAME`
//! directory = "https://acme-v02.api.letsencrypt.org/directory"
//! # directory_ca = "pebble.minica.pem"            # a private CA for the directory's HTTPS
//! contact = ["mailto:ops@example.com"]
//! names = ["www.example.com", "example.com"]
//! key_type = "ec-p256"                           # generated on the token, non-extractable
//! listeners = ["web"]                            # served there as soon as it is issued
//! challenge = "tls-alpn-01"                      # or http-01 (needs [acme_http01])
//! renew_before = 0.333                           # renew when a third of the lifetime is left
//! reuse_key = false                              # a fresh token key per renewal
//! delete_old_key = true                          # delete the old key once its certificate expired
//! # eab = { kid = "...", hmac_key = "file:/etc/tlsgate/eab.key" }  # base64url HMAC key
//!
//! [acme_http01]
//! listen = "0.0.0.0:80"
//! redirect_https = true                          # other requests: 301 to https://host/path
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The default of `renew_before`: a third of the certificate's lifetime left.
pub const DEFAULT_RENEW_BEFORE: f64 = 1.0 / 3.0;
/// The default of `retry_min_ms`: the first retry after a failure, 10 s (before jitter).
pub const DEFAULT_RETRY_MIN_MS: u64 = 10_000;
/// The default of `retry_max_ms`: retries back off up to 6 h apart.
pub const DEFAULT_RETRY_MAX_MS: u64 = 6 * 3600 * 1000;

/// One certificate set issued by an ACME CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// Unique name: the state file, the metrics label, `tlsgate ctl acme renew NAME`.
    pub name: String,
    /// The CA's directory URL (`https://`).
    pub directory: String,
    /// PEM file with the CA certificate(s) that sign the directory's HTTPS certificate, for a
    /// private ACME CA; absent: the system's trust store.
    pub directory_ca: Option<PathBuf>,
    /// Account contacts (`mailto:`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// The DNS names of the certificate (the first is its subject).
    pub names: Vec<String>,
    /// The certificate key's type (a keystore key spec: ec-p256, ec-p384, rsa-2048, ...).
    #[serde(default = "default_key_type")]
    pub key_type: String,
    /// Listeners that serve the certificate (beside their own certificates) and answer its
    /// `tls-alpn-01` challenges.
    pub listeners: Vec<String>,
    /// External Account Binding (RFC 8555 §7.3.4), when the CA requires one.
    pub eab: Option<EabConfig>,
    /// Renew when this fraction of the certificate's lifetime is left (0 < x < 1).
    #[serde(default = "default_renew_before")]
    pub renew_before: f64,
    /// Keep the token key across renewals; by default each renewal generates a fresh one.
    #[serde(default)]
    pub reuse_key: bool,
    /// Delete a replaced key from the token once the certificate it served has expired.
    #[serde(default = "default_true")]
    pub delete_old_key: bool,
    /// The challenge the CA validates.
    #[serde(default)]
    pub challenge: ChallengeKind,
    /// First retry after a failure, in milliseconds (doubles, with jitter, up to `retry_max_ms`;
    /// a CA's `Retry-After` wins when longer).
    #[serde(default = "default_retry_min_ms")]
    pub retry_min_ms: u64,
    /// Longest wait between retries, in milliseconds.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
}

/// `eab = { kid, hmac_key }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EabConfig {
    /// The key identifier the CA gave.
    pub kid: String,
    /// `env:VAR` or `file:PATH` holding the base64url HMAC key (never the key itself).
    pub hmac_key: String,
}

/// Which challenge type to answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ChallengeKind {
    /// RFC 8737: answered by the data plane on the certificate's listeners.
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// RFC 8555 §8.3: answered by the `[acme_http01]` listener.
    #[serde(rename = "http-01")]
    Http01,
}

/// `[acme_http01]`: the plain-HTTP listener for `http-01` challenges.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http01Config {
    /// Where to listen (the CA connects to port 80 of each name).
    pub listen: SocketAddr,
    /// Answer other requests with a redirect to `https://` (else 404).
    #[serde(default)]
    pub redirect_https: bool,
}

fn default_key_type() -> String {
    "ec-p256".into()
}
fn default_renew_before() -> f64 {
    DEFAULT_RENEW_BEFORE
}
fn default_true() -> bool {
    true
}
fn default_retry_min_ms() -> u64 {
    DEFAULT_RETRY_MIN_MS
}
fn default_retry_max_ms() -> u64 {
    DEFAULT_RETRY_MAX_MS
}

/// Cross-field checks: `(key, why)` of the first problem.
pub fn check(
    acme: &[AcmeConfig],
    http01: Option<&Http01Config>,
    listeners: &[String],
    has_state: bool,
    has_token: bool,
) -> Result<(), (String, String)> {
    let mut seen = std::collections::HashSet::new();
    for (i, a) in acme.iter().enumerate() {
        let at = |k: &str| format!("acme[{i}].{k}");
        if !has_state {
            return Err((
                at("name"),
                "ACME needs the state directory ([state] or [api])".into(),
            ));
        }
        if !has_token {
            return Err((
                at("key_type"),
                "ACME keys are generated on the token: configure [pkcs11]".into(),
            ));
        }
        crate::state::check_name("acme", &a.name).map_err(|e| (at("name"), format!("{e:#}")))?;
        if !seen.insert(a.name.as_str()) {
            return Err((at("name"), format!("{:?} is used twice", a.name)));
        }
        if !a.directory.starts_with("https://") {
            return Err((at("directory"), "the directory URL must be https://".into()));
        }
        if a.names.is_empty() {
            return Err((at("names"), "at least one DNS name".into()));
        }
        for n in &a.names {
            crate::tls::normalize_name(n).map_err(|e| (at("names"), e.to_string()))?;
        }
        if a.key_type.parse::<tlsgate_keystore::KeySpec>().is_err() {
            return Err((
                at("key_type"),
                "one of ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096".into(),
            ));
        }
        if a.listeners.is_empty() {
            return Err((
                at("listeners"),
                "name at least one [[listener]] to serve it".into(),
            ));
        }
        for l in &a.listeners {
            if !listeners.contains(l) {
                return Err((at("listeners"), format!("no [[listener]] named {l:?}")));
            }
        }
        if !(a.renew_before > 0.0 && a.renew_before < 1.0) {
            return Err((
                at("renew_before"),
                "a fraction of the lifetime, between 0 and 1".into(),
            ));
        }
        if a.retry_min_ms == 0 || a.retry_max_ms < a.retry_min_ms {
            return Err((
                at("retry_min_ms"),
                "1 or more, and no more than retry_max_ms".into(),
            ));
        }
        if a.challenge == ChallengeKind::Http01 && http01.is_none() {
            return Err((
                at("challenge"),
                "http-01 needs an [acme_http01] listener".into(),
            ));
        }
        if let Some(e) = &a.eab {
            e.hmac_key
                .parse::<tlsgate_keystore::pin::PinSource>()
                .map_err(|e| (at("eab.hmac_key"), format!("{e}; use env:VAR or file:PATH")))?;
        }
    }
    Ok(())
}
