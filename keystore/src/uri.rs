//! PKCS#11 URIs (RFC 7512), the only way the rest of tlsgate names a token key.
//!
//! Only the attributes the keystore acts on are accepted; anything else is an error rather than
//! silently ignored, so a typo (`objet=`) cannot select a different key than the operator meant.

use std::fmt;
use std::str::FromStr;

/// Why a PKCS#11 URI was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    #[error("not a PKCS#11 URI (must start with \"pkcs11:\"): {input:?}")]
    Scheme { input: String },
    #[error("unknown PKCS#11 URI attribute {name:?}")]
    UnknownAttribute { name: String },
    #[error("PKCS#11 URI attribute {name:?} appears twice")]
    DuplicateAttribute { name: String },
    #[error("PKCS#11 URI attribute {name:?} has no '=value'")]
    MissingValue { name: String },
    #[error("bad percent-encoding in PKCS#11 URI attribute {name:?} at byte {offset}")]
    PercentEncoding { name: String, offset: usize },
    #[error("PKCS#11 URI attribute {name:?} is not valid UTF-8")]
    NotUtf8 { name: String },
    #[error(
        "PKCS#11 URI object type {value:?} is not one of private, public, cert, secret-key, data"
    )]
    BadObjectType { value: String },
    #[error("PKCS#11 URI names no token (add token=LABEL or serial=SERIAL)")]
    MissingToken,
    #[error("PKCS#11 URI names no object (add object=LABEL or id=%xx..)")]
    MissingObject,
    #[error("PKCS#11 URI selects slots by number ({name}); tokens move between slots, use token=")]
    SlotAttribute { name: String },
    #[error("PKCS#11 URI carries a PIN in clear (pin-value); use a PIN source (env: or file:)")]
    PinValue,
    #[error("not a key reference (expected \"pkcs11:...\" or \"file:PATH\"): {input:?}")]
    KeyRef { input: String },
}

/// RFC 7512 `type=` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectType {
    Private,
    Public,
    Cert,
    SecretKey,
    Data,
}

impl ObjectType {
    fn as_str(self) -> &'static str {
        match self {
            ObjectType::Private => "private",
            ObjectType::Public => "public",
            ObjectType::Cert => "cert",
            ObjectType::SecretKey => "secret-key",
            ObjectType::Data => "data",
        }
    }
}

impl FromStr for ObjectType {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, UriError> {
        Ok(match s {
            "private" => ObjectType::Private,
            "public" => ObjectType::Public,
            "cert" => ObjectType::Cert,
            "secret-key" => ObjectType::SecretKey,
            "data" => ObjectType::Data,
            _ => {
                return Err(UriError::BadObjectType {
                    value: s.to_owned(),
                })
            }
        })
    }
}

impl fmt::Display for ObjectType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed PKCS#11 URI. `token` or `serial` is always present (a key reference that does not
/// name its token could match a key on any token).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub object_type: Option<ObjectType>,
    /// Query attribute `module-path`: which PKCS#11 module holds the token.
    pub module_path: Option<String>,
    /// Query attribute `pin-source`: where to read the PIN (`env:VAR`, `file:PATH`).
    pub pin_source: Option<String>,
}

impl Pkcs11Uri {
    /// A URI for the private key `object` on token `token`.
    pub fn private_key(token: &str, object: &str) -> Self {
        Pkcs11Uri {
            token: Some(token.to_owned()),
            object: Some(object.to_owned()),
            object_type: Some(ObjectType::Private),
            ..Default::default()
        }
    }

    /// Whether the URI names an object (by label or id) at all.
    pub fn has_object_selector(&self) -> bool {
        self.object.is_some() || self.id.is_some()
    }
}

fn pct_decode(name: &str, value: &str) -> Result<Vec<u8>, UriError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => out.push(b),
                None => {
                    return Err(UriError::PercentEncoding {
                        name: name.to_owned(),
                        offset: i,
                    })
                }
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn pct_decode_str(name: &str, value: &str) -> Result<String, UriError> {
    String::from_utf8(pct_decode(name, value)?).map_err(|_| UriError::NotUtf8 {
        name: name.to_owned(),
    })
}

/// RFC 7512 `pk-pchar` minus the characters we prefer escaped for readability and safety in
/// shells: unreserved characters pass through, everything else is `%XX`.
fn pct_encode(out: &mut String, bytes: &[u8], keep: &[u8]) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

impl FromStr for Pkcs11Uri {
    type Err = UriError;

    fn from_str(input: &str) -> Result<Self, UriError> {
        let rest = input
            .strip_prefix("pkcs11:")
            .ok_or_else(|| UriError::Scheme {
                input: input.to_owned(),
            })?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut uri = Pkcs11Uri::default();

        fn set<T>(slot: &mut Option<T>, name: &str, v: T) -> Result<(), UriError> {
            if slot.is_some() {
                return Err(UriError::DuplicateAttribute {
                    name: name.to_owned(),
                });
            }
            *slot = Some(v);
            Ok(())
        }

        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr.split_once('=').ok_or_else(|| UriError::MissingValue {
                name: attr.to_owned(),
            })?;
            match name {
                "token" => set(&mut uri.token, name, pct_decode_str(name, value)?)?,
                "serial" => set(&mut uri.serial, name, pct_decode_str(name, value)?)?,
                "manufacturer" => set(&mut uri.manufacturer, name, pct_decode_str(name, value)?)?,
                "model" => set(&mut uri.model, name, pct_decode_str(name, value)?)?,
                "object" => set(&mut uri.object, name, pct_decode_str(name, value)?)?,
                "id" => set(&mut uri.id, name, pct_decode(name, value)?)?,
                "type" => set(
                    &mut uri.object_type,
                    name,
                    pct_decode_str(name, value)?.parse()?,
                )?,
                "slot-id" | "slot-description" | "slot-manufacturer" => {
                    return Err(UriError::SlotAttribute {
                        name: name.to_owned(),
                    })
                }
                _ => {
                    return Err(UriError::UnknownAttribute {
                        name: name.to_owned(),
                    })
                }
            }
        }
        for attr in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|a| !a.is_empty())
        {
            let (name, value) = attr.split_once('=').ok_or_else(|| UriError::MissingValue {
                name: attr.to_owned(),
            })?;
            match name {
                "module-path" => set(&mut uri.module_path, name, pct_decode_str(name, value)?)?,
                "pin-source" => set(&mut uri.pin_source, name, pct_decode_str(name, value)?)?,
                "pin-value" => return Err(UriError::PinValue),
                _ => {
                    return Err(UriError::UnknownAttribute {
                        name: name.to_owned(),
                    })
                }
            }
        }
        if uri.token.is_none() && uri.serial.is_none() {
            return Err(UriError::MissingToken);
        }
        Ok(uri)
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::from("pkcs11:");
        let mut first = true;
        let mut attr = |out: &mut String, name: &str, value: &[u8], keep: &[u8]| {
            if !first {
                out.push(';');
            }
            first = false;
            out.push_str(name);
            out.push('=');
            pct_encode(out, value, keep);
        };
        // Characters RFC 7512 allows unescaped in path values that are harmless in shells.
        const PATH_KEEP: &[u8] = b":[]@!$'()*+,=";
        if let Some(v) = &self.token {
            attr(&mut out, "token", v.as_bytes(), PATH_KEEP);
        }
        if let Some(v) = &self.serial {
            attr(&mut out, "serial", v.as_bytes(), PATH_KEEP);
        }
        if let Some(v) = &self.manufacturer {
            attr(&mut out, "manufacturer", v.as_bytes(), PATH_KEEP);
        }
        if let Some(v) = &self.model {
            attr(&mut out, "model", v.as_bytes(), PATH_KEEP);
        }
        if let Some(v) = &self.object {
            attr(&mut out, "object", v.as_bytes(), PATH_KEEP);
        }
        if let Some(t) = self.object_type {
            attr(&mut out, "type", t.as_str().as_bytes(), PATH_KEEP);
        }
        if let Some(id) = &self.id {
            // Ids are binary: always fully escaped so they read the same everywhere.
            if !first {
                out.push(';');
            }
            out.push_str("id=");
            for b in id {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        let mut sep = '?';
        for (name, value) in [
            ("module-path", &self.module_path),
            ("pin-source", &self.pin_source),
        ] {
            if let Some(v) = value {
                out.push(sep);
                sep = '&';
                out.push_str(name);
                out.push('=');
                pct_encode(&mut out, v.as_bytes(), b"/:");
            }
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_common_form() {
        let u: Pkcs11Uri = "pkcs11:token=lab;object=web-ecdsa;type=private"
            .parse()
            .unwrap();
        assert_eq!(u.token.as_deref(), Some("lab"));
        assert_eq!(u.object.as_deref(), Some("web-ecdsa"));
        assert_eq!(u.object_type, Some(ObjectType::Private));
        assert_eq!(u.id, None);
    }

    #[test]
    fn decodes_percent_escapes_and_binary_ids() {
        let u: Pkcs11Uri =
            "pkcs11:token=my%20lab;id=%01%ff%A0;object=a%3Bb?module-path=/usr/lib/x.so"
                .parse()
                .unwrap();
        assert_eq!(u.token.as_deref(), Some("my lab"));
        assert_eq!(u.object.as_deref(), Some("a;b"));
        assert_eq!(u.id, Some(vec![0x01, 0xff, 0xa0]));
        assert_eq!(u.module_path.as_deref(), Some("/usr/lib/x.so"));
    }

    #[test]
    fn round_trips() {
        for s in [
            "pkcs11:token=lab;object=web-ecdsa;type=private",
            "pkcs11:token=my%20lab;object=a%3Bb;type=private;id=%01%FF",
            "pkcs11:serial=0123abcd;object=k?module-path=/opt/p11/lib.so&pin-source=env:PIN",
            "pkcs11:token=%C3%A9t%C3%A9;object=%25%3F%26",
        ] {
            let u: Pkcs11Uri = s.parse().unwrap();
            assert_eq!(u.to_string(), s, "display of {s}");
            let again: Pkcs11Uri = u.to_string().parse().unwrap();
            assert_eq!(again, u);
        }
        let weird = Pkcs11Uri {
            token: Some("a;b?c&d=e%f/g h".into()),
            object: Some("ünï".into()),
            id: Some(vec![0, 255]),
            ..Default::default()
        };
        assert_eq!(weird.to_string().parse::<Pkcs11Uri>().unwrap(), weird);
    }

    #[test]
    fn precise_errors() {
        let err = |s: &str| s.parse::<Pkcs11Uri>().unwrap_err();
        assert_eq!(
            err("file:/x"),
            UriError::Scheme {
                input: "file:/x".into()
            }
        );
        assert_eq!(
            err("pkcs11:token=a;objet=b"),
            UriError::UnknownAttribute {
                name: "objet".into()
            }
        );
        assert_eq!(
            err("pkcs11:token=a;object=b%4"),
            UriError::PercentEncoding {
                name: "object".into(),
                offset: 1
            }
        );
        assert_eq!(
            err("pkcs11:token=a;object=%zz"),
            UriError::PercentEncoding {
                name: "object".into(),
                offset: 0
            }
        );
        assert_eq!(err("pkcs11:object=b;type=private"), UriError::MissingToken);
        assert_eq!(
            err("pkcs11:token=a;token=b"),
            UriError::DuplicateAttribute {
                name: "token".into()
            }
        );
        assert_eq!(
            err("pkcs11:token=a;type=key"),
            UriError::BadObjectType {
                value: "key".into()
            }
        );
        assert_eq!(
            err("pkcs11:token=a;slot-id=3"),
            UriError::SlotAttribute {
                name: "slot-id".into()
            }
        );
        assert_eq!(err("pkcs11:token=a?pin-value=1234"), UriError::PinValue);
        assert_eq!(
            err("pkcs11:token=a;object"),
            UriError::MissingValue {
                name: "object".into()
            }
        );
        assert_eq!(
            err("pkcs11:token=%FF"),
            UriError::NotUtf8 {
                name: "token".into()
            }
        );
    }
}
