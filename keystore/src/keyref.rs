//! Key references as configuration and the management API carry them: `pkcs11:...` for token
//! keys, `file:PATH` for software keys. Loading one yields a rustls signing key.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::sign::SigningKey;

use crate::error::{Error, Result};
use crate::token::Token;
use crate::uri::{Pkcs11Uri, UriError};

/// Where a key lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyRef {
    Pkcs11(Pkcs11Uri),
    File(PathBuf),
}

impl FromStr for KeyRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("pkcs11:") {
            Ok(KeyRef::Pkcs11(s.parse()?))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(UriError::KeyRef {
                    input: s.to_owned(),
                }
                .into());
            }
            Ok(KeyRef::File(PathBuf::from(path)))
        } else {
            Err(UriError::KeyRef {
                input: s.chars().take(128).collect(),
            }
            .into())
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Pkcs11(u) => u.fmt(f),
            KeyRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Which backend holds a loaded key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyBackend {
    Software,
    Pkcs11,
}

/// A key ready for rustls.
#[derive(Debug, Clone)]
pub struct LoadedKey {
    pub signing_key: Arc<dyn SigningKey>,
    pub spki_der: Vec<u8>,
    pub backend: KeyBackend,
}

/// Loads a key. Token keys need the opened token their URI names.
pub fn load(key: &KeyRef, token: Option<&Arc<Token>>) -> Result<LoadedKey> {
    match key {
        KeyRef::File(path) => {
            let sw = crate::software::load_pkcs8_pem(path)?;
            Ok(LoadedKey {
                signing_key: sw.signing_key,
                spki_der: sw.spki_der,
                backend: KeyBackend::Software,
            })
        }
        KeyRef::Pkcs11(uri) => {
            let token = token.ok_or_else(|| Error::TokenNotFound {
                label: uri
                    .token
                    .clone()
                    .or_else(|| uri.serial.clone())
                    .unwrap_or_default(),
                module: uri
                    .module_path
                    .clone()
                    .map(PathBuf::from)
                    .unwrap_or_default(),
            })?;
            let info = token.find(uri)?;
            let signing_key = token.signing_key(uri)?;
            Ok(LoadedKey {
                signing_key,
                spki_der: info.spki_der,
                backend: KeyBackend::Pkcs11,
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            "file:/etc/k.pem".parse::<KeyRef>().unwrap(),
            KeyRef::File("/etc/k.pem".into())
        );
        let k: KeyRef = "pkcs11:token=lab;object=web".parse().unwrap();
        assert!(matches!(k, KeyRef::Pkcs11(ref u) if u.object.as_deref() == Some("web")));
        assert_eq!(k.to_string(), "pkcs11:token=lab;object=web");
        assert!(matches!(
            "/etc/k.pem".parse::<KeyRef>(),
            Err(Error::Uri(UriError::KeyRef { .. }))
        ));
        assert!(matches!(
            "pkcs11:object=web".parse::<KeyRef>(),
            Err(Error::Uri(UriError::MissingToken))
        ));
    }
}
