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
//! [[listener.certificate]]
//! chain = "certs/web-ecdsa.pem"
//! key = "pkcs11:token=lab;object=web-ecdsa;type=private"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tlsgate_dataplane::DataplaneConfig;
use tlsgate_keystore::keyref::KeyRef;
use tlsgate_keystore::pin::PinSource;

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
    /// The management API (see [`crate::api`]).
    pub api: Option<crate::api::ApiConfig>,
    /// The management plane's state directory (see [`crate::state`]).
    pub state: Option<crate::api::StateConfig>,
    /// TLS listeners.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
    /// Directory of the configuration file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this was read from.
    #[serde(skip)]
    pub path: PathBuf,
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
}

fn default_module() -> PathBuf {
    PathBuf::from(crate::cli::token::DEFAULT_MODULE)
}

/// Where Prometheus scrapes `GET /metrics` (plain HTTP; keep it on a management address).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the endpoint, e.g. `127.0.0.1:9100`.
    pub listen: SocketAddr,
}

/// One TLS listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name; labels metrics and logs.
    pub name: String,
    /// Address to accept TLS on.
    pub bind: SocketAddr,
    /// Where decrypted bytes go (TCP).
    pub backend: SocketAddr,
    /// Send a PROXY protocol v2 header to the backend first.
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

    /// Parses and checks configuration text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.path = path.to_owned();
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
        self.dataplane.clone().unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            DataplaneConfig::new((0..n).collect())
        })
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

    fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(self.invalid(
                "listener",
                "no listener: add at least one [[listener]] with name, bind, backend and a [[listener.certificate]]",
            ));
        }
        self.pin_source()?;
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
        }
        if needs_token && self.pkcs11.is_none() {
            return Err(self.invalid(
                "pkcs11",
                "a certificate key is a pkcs11: URI, so a [pkcs11] section with module, token and pin is needed",
            ));
        }
        crate::api::validate(self)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/tlsgate/tlsgate.toml"))
    }

    const GOOD: &str = r#"
        [pkcs11]
        token = "lab"
        pin = "env:TLSGATE_PIN"

        [[listener]]
        name = "web"
        bind = "127.0.0.1:8443"
        backend = "127.0.0.1:8080"

        [[listener.certificate]]
        chain = "web.pem"
        key = "pkcs11:token=lab;object=web-ecdsa;type=private"
    "#;

    #[test]
    fn a_good_file_parses_with_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.listeners.len(), 1);
        assert!(!c.listeners[0].proxy_protocol);
        assert_eq!(
            c.resolve(Path::new("web.pem")),
            Path::new("/etc/tlsgate/web.pem")
        );
        assert!(!c.dataplane().cores.is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err =
            parse(&GOOD.replace("backend =", "bakend = \"x\"\n backend =")).expect_err("typo");
        assert!(err.to_string().contains("bakend"), "{err}");
    }

    #[test]
    fn a_token_key_without_pkcs11_section_is_an_error() {
        let text = GOOD.replace(
            "[pkcs11]\n        token = \"lab\"\n        pin = \"env:TLSGATE_PIN\"",
            "",
        );
        let err = parse(&text).expect_err("needs [pkcs11]");
        assert!(
            matches!(err, ConfigError::Invalid { ref key, .. } if key == "pkcs11"),
            "{err}"
        );
    }

    #[test]
    fn a_pin_in_clear_is_refused() {
        let err = parse(&GOOD.replace("env:TLSGATE_PIN", "1234")).expect_err("clear PIN");
        assert!(
            matches!(err, ConfigError::Invalid { ref key, .. } if key == "pkcs11.pin"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_key_reference_names_its_key() {
        let err = parse(&GOOD.replace(
            "pkcs11:token=lab;object=web-ecdsa;type=private",
            "pkcs11:tokn=lab",
        ))
        .expect_err("bad uri");
        assert!(
            matches!(err, ConfigError::Invalid { ref key, .. } if key == "listener[0].certificate[0].key"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_listener_names_are_refused() {
        let twice = format!("{GOOD}\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:9443\"\nbackend = \"127.0.0.1:8080\"\n[[listener.certificate]]\nchain = \"a\"\nkey = \"file:k.pem\"\n");
        let err = parse(&twice).expect_err("duplicate");
        assert!(err.to_string().contains("used twice"), "{err}");
    }
}
