//! The TOML configuration of `tlsgate serve`.
//!
//! Parsed once into types; unknown keys are rejected, every default is a named constant of the
//! crate that owns the setting, and cross-field checks run at load so a bad file fails at boot
//! with a message that names the key. Relative paths are relative to the configuration file.
//!
//! ```toml
//! [pkcs11]                                  # needed when a key is a pkcs11: URI
//! module = "/usr/lib/softhsm/libsofthsm2.so"
//! token = "lab"
//! pin = "file:/etc/tlsgate/user.pin"         # or env:VAR; never the PIN itself
//! open_timeout_ms = 30000                   # start-up gives up on a silent HSM after this
//! call_timeout_ms = 10000                   # management calls answer hsm_timeout after this
//! probe_interval_ms = 2000                  # a cheap call finds an outage before a handshake
//! start_degraded = false                    # true: start without the HSM, keep trying
//! breaker_errors = 5                        # device errors in a row that take a token out
//! max_inflight = 32                         # signatures on this token at once
//!
//! [[pkcs11.replica]]                        # optional: another HSM holding the same keys
//! module = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
//! token = "lab-b"
//! pin = "file:/etc/tlsgate/user-b.pin"
//! max_inflight = 32
//!
//! [metrics]                                 # optional Prometheus endpoint
//! listen = "127.0.0.1:9100"
//!
//! [dataplane]                               # optional; see the README for every key
//! cores = [0, 1]
//! io = "auto"                               # auto | uring | portable
//!
//! [[listener]]
//! name = "web"
//! bind = "0.0.0.0:443"
//! backend = "127.0.0.1:8080"
//! proxy_protocol = false
//!
//! policy = "intermediate"                  # intermediate | modern | strict | custom
//! unknown_sni = "default"                   # default | refuse
//!
//! [[listener.certificate]]
//! chain = "certs/web-ecdsa.pem"
//! key = "pkcs11:token=lab;object=web-ecdsa;type=private"
//!
//! [listener.client_auth]                    # optional mTLS
//! mode = "required"                         # required | optional
//! ca = "zones/partners-ca.pem"
//! crls = ["zones/partners.crl.pem"]
//! ```
//!
//! With `policy = "custom"`, `[listener.custom_policy]` holds `versions`, `suites`, `groups`
//! (see [`crate::tls::policy`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tlsgate_dataplane::DataplaneConfig;
use tlsgate_keystore::keyref::KeyRef;
use tlsgate_keystore::pin::PinSource;

pub mod acme;
pub mod backend;
mod backend_tls;
pub mod fleet;
pub mod fleet_overlay;
pub mod landlock;
pub mod management;

pub use backend::{PoolConfig, RouteConfig};
pub use backend_tls::BackendTlsConfig;
pub use management::{ApiConfig, StateConfig};

/// A configuration error that names the key and says what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value that parses but does not make sense.
    #[error("{}: `{key}`: {why}", path.display())]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The offending key, e.g. `listener[0].certificate[1].key`.
        key: String,
        /// What is wrong and what is allowed.
        why: String,
    },
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The PKCS#11 token holding the keys.
    pub pkcs11: Option<Pkcs11Config>,
    /// Cores, io driver, limits and key-operation settings.
    pub dataplane: Option<DataplaneConfig>,
    /// The Prometheus endpoint.
    pub metrics: Option<MetricsConfig>,
    /// Process hardening and resources (core dumps, see [`crate::hardening`]; the
    /// file-descriptor budget, see [`crate::fdlimit`]).
    #[serde(default)]
    pub process: crate::hardening::ProcessConfig,
    /// Settings for every listener's TLS (`[tls]`).
    #[serde(default)]
    pub tls: TlsConfig,
    /// The management API (see [`crate::api`]).
    pub api: Option<ApiConfig>,
    /// The management plane's state directory (see [`crate::state`]).
    pub state: Option<StateConfig>,
    /// OCSP fetches (see [`crate::tls::stapler`]).
    #[serde(default)]
    pub ocsp: OcspConfig,
    /// TLS listeners.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
    /// Backend pools (`[[backend]]`, see [`backend`]).
    #[serde(rename = "backend", default)]
    pub pools: Vec<PoolConfig>,
    /// Certificates issued and renewed by an ACME CA (`[[acme]]`, see [`crate::acme`]).
    #[serde(rename = "acme", default)]
    pub acme: Vec<crate::config::acme::AcmeConfig>,
    /// The plain-HTTP listener answering ACME `http-01` challenges.
    pub acme_http01: Option<crate::config::acme::Http01Config>,
    /// Fleet mode: the desired state in etcd (`[fleet]`, see [`crate::fleet`]).
    pub fleet: Option<fleet::FleetConfig>,
    /// Whether the file sets `[dataplane.limits] max_connections_per_core` itself (a default is
    /// fitted to the file-descriptor limit; a value the operator chose is not lowered silently).
    #[serde(skip)]
    pub max_connections_set: bool,
    /// Directory of the configuration file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[tls]`: settings that apply to every listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Refuse to start unless this binary runs TLS on the AWS-LC FIPS module (a build with the
    /// cargo feature `fips`) and every listener's policy is FIPS-approved.
    #[serde(default)]
    pub require_fips: bool,
}

/// `[ocsp]`: how responses are fetched from the responders certificates name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcspConfig {
    /// One fetch (resolve, connect, request, answer) gives up after this long.
    #[serde(default = "default_ocsp_timeout_ms")]
    pub timeout_ms: u64,
    /// Staple certificates bound through the management API from the responder their leaf
    /// names (Authority Information Access), as `ocsp_fetch = true` does for the file's.
    #[serde(default = "default_true")]
    pub api_fetch: bool,
}

impl Default for OcspConfig {
    fn default() -> Self {
        OcspConfig {
            timeout_ms: default_ocsp_timeout_ms(),
            api_fetch: true,
        }
    }
}

impl OcspConfig {
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }
}

/// The default of `[ocsp] timeout_ms` (`crate::ocsp::FETCH_TIMEOUT`).
fn default_ocsp_timeout_ms() -> u64 {
    5_000
}

fn default_true() -> bool {
    true
}

/// Where the token is and how to log in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// PKCS#11 module (shared library).
    #[serde(default = "default_module")]
    pub module: PathBuf,
    /// Token label (never a slot number: slots move).
    pub token: String,
    /// `env:VAR` or `file:PATH` (mode 0600). The PIN itself never appears in the file.
    pub pin: String,
    /// How long `tlsgate serve` waits for the token at start-up (load, find, log in) before it
    /// exits with the reason, in milliseconds.
    #[serde(default = "default_open_timeout_ms")]
    pub open_timeout_ms: u64,
    /// When the token (or a replica) cannot be opened within `open_timeout_ms`, start anyway:
    /// software-key listeners serve, token-key certificates refuse full handshakes at once, and
    /// a background thread keeps opening the tokens; once they are open the certificates are
    /// loaded (keys looked up, matched against their certificates) as by a reload.
    #[serde(default)]
    pub start_degraded: bool,
    /// How long a management API call that touches the token (key list, generate, import, CSR,
    /// bind, reload) may take before it answers `hsm_timeout`, in milliseconds.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// How often `tlsgate serve` probes the token with a cheap call while it is in service
    /// (`C_GetSessionInfo`), so an outage is found before a handshake meets it, in milliseconds;
    /// 0 turns the probe off.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// Device-level errors in a row (no success between them) that take a token out of
    /// service (open its breaker); applies to the replicas too. A failed probe opens it at once.
    #[serde(default = "default_breaker_errors")]
    pub breaker_errors: u32,
    /// Signatures on this token at once (its in-flight budget). Little's law: rate × latency.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u64,
    /// Other tokens holding the same keys (same label or id and public key, checked at load):
    /// signatures go to the one in service with the fewest signatures in flight that has room in
    /// its `max_inflight`, and a failed one is tried once more on another. Key management (generate, import, CSR) uses the token above.
    #[serde(default)]
    pub replica: Vec<ReplicaConfig>,
}

/// `[[pkcs11.replica]]`: another module/token with the same keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// PKCS#11 module (shared library).
    #[serde(default = "default_module")]
    pub module: PathBuf,
    /// Token label.
    pub token: String,
    /// `env:VAR` or `file:PATH`, like `[pkcs11] pin`.
    pub pin: String,
    /// Signatures on this token at once, like `[pkcs11] max_inflight`.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u64,
}

fn default_breaker_errors() -> u32 {
    tlsgate_keystore::token::DEFAULT_BREAKER_ERRORS
}

fn default_max_inflight() -> u64 {
    tlsgate_keystore::token::DEFAULT_MAX_INFLIGHT
}

/// Default of `[pkcs11] probe_interval_ms`: 2 s.
pub const DEFAULT_PROBE_INTERVAL_MS: u64 = 2_000;

fn default_probe_interval_ms() -> u64 {
    DEFAULT_PROBE_INTERVAL_MS
}

/// Default of `[pkcs11] open_timeout_ms`: 30 s.
pub const DEFAULT_OPEN_TIMEOUT_MS: u64 = 30_000;
/// Default of `[pkcs11] call_timeout_ms`: 10 s.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 10_000;

fn default_open_timeout_ms() -> u64 {
    DEFAULT_OPEN_TIMEOUT_MS
}

fn default_call_timeout_ms() -> u64 {
    DEFAULT_CALL_TIMEOUT_MS
}

impl Pkcs11Config {
    pub fn open_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.open_timeout_ms.max(1))
    }

    pub fn call_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.call_timeout_ms.max(1))
    }
}

/// The PKCS#11 module Debian's `softhsm2` package installs: `[pkcs11] module` when it is not
/// set, and `tlsgate token`'s default.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn default_module() -> PathBuf {
    PathBuf::from(DEFAULT_MODULE)
}

/// Where Prometheus scrapes `GET /metrics` (plain HTTP; keep it on a management address).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the endpoint, e.g. `127.0.0.1:9100`.
    pub listen: SocketAddr,
    /// Connections held at most; past it a new one replaces the oldest idle one.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

/// Default connection bound of the metrics endpoint and the management API.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

pub fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

/// One TLS listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name; labels metrics and logs.
    pub name: String,
    /// Address to accept TLS on.
    pub bind: SocketAddr,
    /// Where decrypted bytes go (TCP): a one-server pool. Or name pools with `default_backend`
    /// and `[[listener.route]]`.
    pub backend: Option<SocketAddr>,
    /// The `[[backend]]` pool a ClientHello no route takes; absent (and no `backend`): such a
    /// hello gets `unrecognized_name`.
    pub default_backend: Option<String>,
    /// Routes by SNI and ALPN to `[[backend]]` pools.
    #[serde(rename = "route", default)]
    pub routes: Vec<RouteConfig>,
    /// Send a PROXY protocol v2 header to the backend first (`backend` only; pools have their
    /// own).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Certificates served; with several (ECDSA and RSA) each client gets one its signature
    /// algorithms allow, the first listed preferred.
    #[serde(rename = "certificate", default)]
    pub certificates: Vec<CertificateConfig>,
    /// A ClientHello naming a host no certificate serves: `default` serves the default
    /// certificate(s), `refuse` ends the handshake.
    #[serde(default)]
    pub unknown_sni: crate::tls::UnknownSni,
    /// TLS policy profile: `intermediate` (default), `modern`, `strict` or `custom`.
    #[serde(default)]
    pub policy: crate::tls::policy::Profile,
    /// The lists of the `custom` profile.
    pub custom_policy: Option<crate::tls::policy::CustomPolicy>,
    /// Client-certificate authentication; none when absent.
    pub client_auth: Option<crate::tls::client_auth::ClientAuthConfig>,
    /// Session resumption: tickets, their rotation and lifetime, the session cache, fleet
    /// tickets (`[listener.session]`; defaults in `crate::tls::session`).
    #[serde(default)]
    pub session: crate::tls::session::SessionConfig,
    /// TLS to the backend (its CA, expected name, optional client certificate); `backend`
    /// only, pools have their own.
    pub backend_tls: Option<BackendTlsConfig>,
}

impl ListenerConfig {
    /// The listener's resolved TLS policy.
    pub fn tls_policy(
        &self,
    ) -> Result<crate::tls::policy::TlsPolicy, crate::tls::policy::PolicyError> {
        crate::tls::policy::TlsPolicy::new(self.policy, self.custom_policy.as_ref())
    }
}

/// A certificate chain and the key that goes with it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM file: the leaf first, then intermediates in order.
    pub chain: PathBuf,
    /// `pkcs11:` URI of a token key, or `file:PATH` of a PKCS#8 PEM (software key, development).
    pub key: String,
    /// SNI names this certificate answers for (`*.` wildcards allowed); the leaf's DNS SANs when
    /// absent.
    pub names: Option<Vec<String>>,
    /// DER OCSP response to staple (checked first: see `ocsp.rs`); re-read on reload and when
    /// the current one nears its nextUpdate.
    pub ocsp: Option<PathBuf>,
    /// Fetch the OCSP response from the responder named in the leaf (AIA, http://) instead of
    /// a file; refreshed like a file. Not with `ocsp`.
    #[serde(default)]
    pub ocsp_fetch: bool,
    /// Answers clients that send no SNI (or an unknown one, unless `unknown_sni = "refuse"`).
    /// When no certificate of a listener is marked, all of them are defaults.
    #[serde(default)]
    pub default: bool,
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// As [`Config::load`], with the fleet's configuration (`fleet`: a TOML document, see
    /// [`fleet_overlay`]) merged over the file's.
    pub fn load_with_fleet(path: &Path, fleet: Option<&str>) -> Result<Config, ConfigError> {
        let Some(fleet) = fleet else {
            return Self::load(path);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let with_fleet =
            || PathBuf::from(format!("{} with the fleet configuration", path.display()));
        let merged = fleet_overlay::merge(&text, fleet).map_err(|message| ConfigError::Parse {
            path: with_fleet(),
            message,
        })?;
        Self::parse(&merged, path).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: with_fleet(),
                message,
            },
            ConfigError::Invalid { key, why, .. } => ConfigError::Invalid {
                path: with_fleet(),
                key,
                why,
            },
            other => other,
        })
    }

    /// Parses and checks configuration text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.path = path.to_owned();
        config.max_connections_set = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| {
                t.get("dataplane")?
                    .get("limits")?
                    .get("max_connections_per_core")
                    .cloned()
            })
            .is_some();
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        config.validate()?;
        Ok(config)
    }

    /// The data-plane settings, with every core of the machine when `[dataplane]` is absent.
    pub fn dataplane(&self) -> DataplaneConfig {
        self.dataplane
            .clone()
            .unwrap_or_else(|| DataplaneConfig::new(tlsgate_dataplane::config::all_cores()))
    }

    /// Every TCP port this process binds, from the file: the listeners, the metrics endpoint
    /// the management API's HTTPS and the ACME http-01 listener. Landlock allows binds to these
    /// ports only (0 stands for "a port the kernel picks"). A new kind of listener adds its port
    /// here.
    pub fn tcp_bind_ports(&self) -> std::collections::BTreeSet<u16> {
        let listeners = self.listeners.iter().map(|l| l.bind.port());
        let metrics = self.metrics.iter().map(|m| m.listen.port());
        let api = self.api.iter().filter_map(|a| a.listen).map(|a| a.port());
        let http01 = self.acme_http01.iter().map(|h| h.listen.port());
        listeners.chain(metrics).chain(api).chain(http01).collect()
    }

    /// Resolves a path from the file against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The PIN source of `[pkcs11]`, parsed.
    pub fn pin_source(&self) -> Result<Option<PinSource>, ConfigError> {
        match &self.pkcs11 {
            None => Ok(None),
            Some(p) => {
                p.pin.parse::<PinSource>().map(Some).map_err(|e| {
                    self.invalid("pkcs11.pin", format!("{e}; use env:VAR or file:PATH"))
                })
            }
        }
    }

    fn invalid(&self, key: impl Into<String>, why: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.into(),
            why: why.into(),
        }
    }

    /// A listener forwards to `backend` or to pools, and names only pools that exist.
    fn check_listener_backends(&self, i: usize, l: &ListenerConfig) -> Result<(), ConfigError> {
        let at = format!("listener[{i}]");
        if l.backend.is_some() && l.default_backend.is_some() {
            return Err(self.invalid(
                format!("{at}.default_backend"),
                "`backend` (an address) and `default_backend` (a pool) exclude each other: keep one",
            ));
        }
        if l.backend.is_none() && l.default_backend.is_none() && l.routes.is_empty() {
            return Err(self.invalid(
                format!("{at}.backend"),
                "no backend: set backend = \"host:port\", or default_backend and/or [[listener.route]] naming [[backend]] pools",
            ));
        }
        if l.backend.is_none() {
            if l.proxy_protocol {
                return Err(self.invalid(
                    format!("{at}.proxy_protocol"),
                    "without `backend`, set proxy_protocol on the [[backend]] pools",
                ));
            }
            if l.backend_tls.is_some() {
                return Err(self.invalid(
                    format!("{at}.backend_tls"),
                    "without `backend`, set backend_tls on the [[backend]] pools",
                ));
            }
        }
        backend::check_routes(&at, &l.routes, l.default_backend.as_deref(), &self.pools)
            .map_err(|(k, why)| self.invalid(k, why))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(self.invalid(
                "listener",
                "no listener: add at least one [[listener]] with name, bind, backend and a [[listener.certificate]]",
            ));
        }
        self.pin_source()?;
        let names: Vec<String> = self.listeners.iter().map(|l| l.name.clone()).collect();
        crate::config::acme::check(
            &self.acme,
            self.acme_http01.as_ref(),
            &names,
            management::state_dir(self).is_some(),
            self.pkcs11.is_some(),
        )
        .map_err(|(k, why)| self.invalid(k, why))?;
        if self.tls.require_fips && !crate::policy::fips_build() {
            return Err(self.invalid(
                "tls.require_fips",
                "this tlsgate is not a FIPS build (`tlsgate version` says so); build it with `--features fips` (scripts/fips.sh) or set require_fips = false",
            ));
        }
        if self.tls.require_fips {
            for (i, l) in self.listeners.iter().enumerate() {
                let fips = crate::policy::TlsPolicy::new(l.policy, l.custom_policy.as_ref())
                    .map(|p| p.fips());
                if fips == Ok(false) {
                    return Err(self.invalid(
                        format!("listener[{i}].policy"),
                        "not FIPS-approved as configured although [tls] require_fips = true",
                    ));
                }
            }
        }
        if let Some(p) = &self.pkcs11 {
            if p.breaker_errors == 0 {
                return Err(self.invalid(
                    "pkcs11.breaker_errors",
                    "0 would never take a failing token out of service; use 1 or more",
                ));
            }
            if p.start_degraded && management::state_dir(self).is_some() {
                return Err(self.invalid(
                    "pkcs11.start_degraded",
                    "not supported with the management API's state ([api] or [state]): the API needs the token at start",
                ));
            }
            if p.max_inflight == 0 {
                return Err(self.invalid(
                    "pkcs11.max_inflight",
                    "0 would never let a signature through; use 1 or more",
                ));
            }
            for (i, r) in p.replica.iter().enumerate() {
                if r.max_inflight == 0 {
                    return Err(self.invalid(
                        format!("pkcs11.replica[{i}].max_inflight"),
                        "0 would never let a signature through; use 1 or more",
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut needs_token = false;
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty()
                || !l
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(self.invalid(
                    format!("listener[{i}].name"),
                    format!("{:?}: use letters, digits, '-' and '_' only", l.name),
                ));
            }
            if !names.insert(l.name.as_str()) {
                return Err(self.invalid(
                    format!("listener[{i}].name"),
                    format!("{:?} is used twice", l.name),
                ));
            }
            if let Some(m) = &self.metrics {
                if m.listen == l.bind && m.listen.port() != 0 {
                    return Err(self.invalid(
                        "metrics.listen",
                        format!(
                            "{} is also listener[{i}].bind: metrics never share a TLS listener",
                            m.listen
                        ),
                    ));
                }
            }
            if l.bind.port() != 0 && !binds.insert(l.bind) {
                return Err(self.invalid(
                    format!("listener[{i}].bind"),
                    format!("{} is used twice", l.bind),
                ));
            }
            l.tls_policy().map_err(|e| {
                let key = if self.listeners[i].custom_policy.is_some() {
                    "custom_policy"
                } else {
                    "policy"
                };
                self.invalid(format!("listener[{i}].{key}"), e.to_string())
            })?;
            l.session
                .check()
                .map_err(|(key, why)| self.invalid(format!("listener[{i}].session.{key}"), why))?;
            if l.session.fleet_secret.is_some() {
                needs_token = true;
            }
            // With the management API, a listener may start without certificates and get
            // them through a binding (it refuses handshakes until then).
            if l.certificates.is_empty() && self.api.is_none() && self.state.is_none() {
                return Err(self.invalid(
                    format!("listener[{i}].certificate"),
                    "no certificate: add a [[listener.certificate]] with chain and key, or bind one through the management API ([api])",
                ));
            }
            for (j, c) in l.certificates.iter().enumerate() {
                for name in c.names.iter().flatten() {
                    crate::tls::normalize_name(name).map_err(|e| {
                        self.invalid(
                            format!("listener[{i}].certificate[{j}].names"),
                            e.to_string(),
                        )
                    })?;
                }
                if c.ocsp_fetch && c.ocsp.is_some() {
                    return Err(self.invalid(
                        format!("listener[{i}].certificate[{j}].ocsp_fetch"),
                        "`ocsp` (a file) and `ocsp_fetch = true` (the responder) exclude each other: keep one",
                    ));
                }
                let key: KeyRef = c.key.parse().map_err(|e| {
                    self.invalid(
                        format!("listener[{i}].certificate[{j}].key"),
                        format!("{e}; use a pkcs11: URI or file:PATH"),
                    )
                })?;
                if matches!(key, KeyRef::Pkcs11(_)) {
                    needs_token = true;
                }
            }
            self.check_listener_backends(i, l)?;
            if let Some(bt) = &l.backend_tls {
                needs_token |= bt.check().map_err(|(field, why)| {
                    self.invalid(format!("listener[{i}].backend_tls.{field}"), why)
                })?;
            }
        }
        needs_token |=
            backend::check_pools(&self.pools).map_err(|(k, why)| self.invalid(k, why))?;
        if needs_token && self.pkcs11.is_none() {
            return Err(self.invalid(
                "pkcs11",
                "a certificate key or a session.fleet_secret is a pkcs11: URI, so a [pkcs11] section with module, token and pin is needed",
            ));
        }
        management::validate(self)?;
        if let Some(f) = &self.fleet {
            fleet::check(f, management::state_dir(self).is_some())
                .map_err(|(k, why)| self.invalid(k, why))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
