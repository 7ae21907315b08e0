//! What the keystore tells the rest of tlsgate about a key: its kind, where it came from, its
//! protection attributes and its public half. Never anything of the private half.

use std::fmt;
use std::str::FromStr;

use crate::asn1::{self, oid};
use crate::error::{Error, Result};
use crate::uri::{ObjectType, Pkcs11Uri};

/// The keys the keystore can generate on a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySpec {
    EcP256,
    EcP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
    Ed25519,
}

impl KeySpec {
    pub const ALL: [KeySpec; 6] = [
        KeySpec::EcP256,
        KeySpec::EcP384,
        KeySpec::Rsa2048,
        KeySpec::Rsa3072,
        KeySpec::Rsa4096,
        KeySpec::Ed25519,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeySpec::EcP256 => "ec-p256",
            KeySpec::EcP384 => "ec-p384",
            KeySpec::Rsa2048 => "rsa-2048",
            KeySpec::Rsa3072 => "rsa-3072",
            KeySpec::Rsa4096 => "rsa-4096",
            KeySpec::Ed25519 => "ed25519",
        }
    }

    /// The kind of key this spec produces.
    pub fn kind(self) -> KeyKind {
        match self {
            KeySpec::EcP256 => KeyKind::EcP256,
            KeySpec::EcP384 => KeyKind::EcP384,
            KeySpec::Rsa2048 => KeyKind::Rsa { bits: 2048 },
            KeySpec::Rsa3072 => KeyKind::Rsa { bits: 3072 },
            KeySpec::Rsa4096 => KeyKind::Rsa { bits: 4096 },
            KeySpec::Ed25519 => KeyKind::Ed25519,
        }
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeySpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        KeySpec::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::UnsupportedKey {
                reason: format!(
                "unknown key spec {s:?}; expected one of ec-p256, ec-p384, rsa-2048, rsa-3072, \
                 rsa-4096, ed25519"
            ),
            })
    }
}

/// A key's algorithm and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    EcP256,
    EcP384,
    Rsa { bits: u32 },
    Ed25519,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::EcP256 => f.write_str("ec-p256"),
            KeyKind::EcP384 => f.write_str("ec-p384"),
            KeyKind::Rsa { bits } => write!(f, "rsa-{bits}"),
            KeyKind::Ed25519 => f.write_str("ed25519"),
        }
    }
}

impl KeyKind {
    /// Reads the kind from an SPKI (what a certificate or a software key carries).
    pub fn from_spki(spki_der: &[u8]) -> Result<KeyKind> {
        let bad = |reason: &str| Error::UnsupportedKey {
            reason: reason.to_owned(),
        };
        let parts =
            asn1::parse_spki(spki_der).ok_or_else(|| bad("malformed SubjectPublicKeyInfo"))?;
        if parts.algorithm == oid::EC_PUBLIC_KEY {
            let curve = parts
                .params
                .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
                .ok_or_else(|| bad("EC key without a named curve"))?;
            if curve == oid::P256 {
                Ok(KeyKind::EcP256)
            } else if curve == oid::P384 {
                Ok(KeyKind::EcP384)
            } else {
                Err(bad("EC curve other than P-256/P-384"))
            }
        } else if parts.algorithm == oid::RSA_ENCRYPTION {
            use der::Decode;
            let rsa = pkcs1::RsaPublicKey::from_der(parts.public_key)
                .map_err(|_| bad("malformed RSA public key"))?;
            let bits = modulus_bits(rsa.modulus.as_bytes());
            Ok(KeyKind::Rsa { bits })
        } else if parts.algorithm == oid::ED25519 {
            Ok(KeyKind::Ed25519)
        } else {
            Err(bad("public key algorithm other than EC, RSA or Ed25519"))
        }
    }
}

pub(crate) fn modulus_bits(n: &[u8]) -> u32 {
    let skip = n.iter().take_while(|&&b| b == 0).count();
    let n = &n[skip..];
    match n.first() {
        None => 0,
        Some(&top) => (n.len() as u32 - 1) * 8 + (8 - top.leading_zeros()),
    }
}

/// Whether the token generated the key itself or it was imported (CKA_LOCAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyOrigin {
    Generated,
    Imported,
}

impl fmt::Display for KeyOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyOrigin::Generated => "generated",
            KeyOrigin::Imported => "imported",
        })
    }
}

/// A private key on a token, as its attributes describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub label: String,
    pub id: Vec<u8>,
    pub kind: KeyKind,
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
    pub origin: KeyOrigin,
    pub spki_der: Vec<u8>,
}

impl KeyInfo {
    /// Hex SHA-256 over the SPKI DER: the same value `openssl pkey -pubin -outform DER | sha256sum`
    /// prints, so operators can match keys and certificates by eye.
    pub fn fingerprint_sha256(&self) -> String {
        spki_fingerprint(&self.spki_der)
    }

    /// The URI naming this private key on `token_label` (by label and id).
    pub fn uri(&self, token_label: &str) -> Pkcs11Uri {
        Pkcs11Uri {
            token: Some(token_label.to_owned()),
            object: Some(self.label.clone()),
            id: (!self.id.is_empty()).then(|| self.id.clone()),
            object_type: Some(ObjectType::Private),
            ..Default::default()
        }
    }

    pub fn spki_pem(&self) -> String {
        spki_pem(&self.spki_der)
    }
}

pub(crate) fn spki_fingerprint(spki_der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        spki_der,
    ))
}

/// PEM of an SPKI (`-----BEGIN PUBLIC KEY-----`).
pub fn spki_pem(spki_der: &[u8]) -> String {
    pem_encode("PUBLIC KEY", spki_der)
}

/// PEM (64-character lines, LF) of `der` under `label`, as OpenSSL writes it.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    // Fails only for a label that is not RFC 7468's (ours are constants) or a length past
    // `usize`.
    pem_rfc7468::encode_string(label, pem_rfc7468::LineEnding::LF, der).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for spec in KeySpec::ALL {
            assert_eq!(spec.as_str().parse::<KeySpec>().unwrap(), spec);
        }
        assert!(matches!(
            "rsa-1024".parse::<KeySpec>(),
            Err(Error::UnsupportedKey { .. })
        ));
    }

    #[test]
    fn modulus_bits_counts() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0, 0]), 24);
        assert_eq!(modulus_bits(&[0x01]), 1);
        assert_eq!(modulus_bits(&[0xff; 256]), 2048);
    }

    #[test]
    fn pem_encodes_like_base64() {
        let pem = pem_encode("X", b"hello world!?");
        assert_eq!(
            pem,
            "-----BEGIN X-----\naGVsbG8gd29ybGQhPw==\n-----END X-----\n"
        );
        let kind = KeyKind::from_spki(&asn1::rsa_spki(&[0xc1; 384], &[1, 0, 1]).unwrap()).unwrap();
        assert_eq!(kind, KeyKind::Rsa { bits: 3072 });
    }
}
