//! `[listener.backend_tls]`: plain data and the load-time checks that need no files. The TLS
//! client configuration is built from it by `crate::backend_tls`.

use rustls::pki_types::ServerName;
use serde::Deserialize;
use tlsgate_keystore::keyref::KeyRef;

/// `[listener.backend_tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// PEM bundle of the CA certificates the backend's chain must lead to.
    pub ca: std::path::PathBuf,
    /// The name (DNS name or IP address) the backend's certificate must carry; sent as SNI when
    /// it is a DNS name.
    pub server_name: String,
    /// Client certificate chain (PEM, leaf first) for backends that require one.
    pub chain: Option<std::path::PathBuf>,
    /// Its key: `pkcs11:` URI on the token, or `file:PATH` (software key).
    pub key: Option<String>,
}

impl BackendTlsConfig {
    /// Load-time checks that need no files: `server_name` is a name, `chain` and `key` come
    /// together, `key` parses. Returns whether the key is on the token.
    pub fn check(&self) -> Result<bool, (&'static str, String)> {
        if ServerName::try_from(self.server_name.as_str()).is_err() {
            return Err((
                "server_name",
                format!("{:?} is not a DNS name or an IP address", self.server_name),
            ));
        }
        match (&self.chain, &self.key) {
            (None, None) => Ok(false),
            (Some(_), None) => Err((
                "key",
                "`chain` is set without `key`: set both or neither".into(),
            )),
            (None, Some(_)) => Err((
                "chain",
                "`key` is set without `chain`: set both or neither".into(),
            )),
            (Some(_), Some(k)) => {
                let key: KeyRef = k
                    .parse()
                    .map_err(|e| ("key", format!("{e}; use a pkcs11: URI or file:PATH")))?;
                Ok(matches!(key, KeyRef::Pkcs11(_)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(chain: Option<&str>, key: Option<&str>, name: &str) -> BackendTlsConfig {
        BackendTlsConfig {
            ca: "ca.pem".into(),
            server_name: name.into(),
            chain: chain.map(Into::into),
            key: key.map(Into::into),
        }
    }

    #[test]
    fn load_time_checks_name_the_key() {
        assert_eq!(cfg(None, None, "app.internal").check(), Ok(false));
        assert_eq!(cfg(None, None, "10.0.0.1").check(), Ok(false));
        assert_eq!(
            cfg(
                Some("c.pem"),
                Some("pkcs11:token=lab;object=c;type=private"),
                "a"
            )
            .check(),
            Ok(true)
        );
        assert_eq!(
            cfg(None, None, "not a name").check().map_err(|e| e.0),
            Err("server_name")
        );
        assert_eq!(
            cfg(Some("c.pem"), None, "a").check().map_err(|e| e.0),
            Err("key")
        );
        assert_eq!(
            cfg(None, Some("file:k.pem"), "a").check().map_err(|e| e.0),
            Err("chain")
        );
        assert_eq!(
            cfg(Some("c.pem"), Some("pkcs11:tokn=x"), "a")
                .check()
                .map_err(|e| e.0),
            Err("key")
        );
    }
}
