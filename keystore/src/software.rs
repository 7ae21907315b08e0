//! Software keys: a PKCS#8 PEM file signed with in-process aws-lc-rs. For development and as an
//! explicit operator choice; the key bytes live in this process's memory, unlike token keys.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::SigningKey;
use zeroize::Zeroizing;

use crate::asn1::oid;
use crate::error::{Error, Result};
use crate::keyinfo::KeyKind;

/// An in-process key behind the same rustls interface as token keys.
#[derive(Debug, Clone)]
pub struct SoftwareKey {
    pub signing_key: Arc<dyn SigningKey>,
    pub spki_der: Vec<u8>,
    pub kind: KeyKind,
}

/// Loads a private key PEM (PKCS#8; SEC1 and PKCS#1 are accepted too).
pub fn load_pkcs8_pem(path: &Path) -> Result<SoftwareKey> {
    let pem = Zeroizing::new(std::fs::read(path).map_err(|e| Error::io(path, e))?);
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Error::KeyParse {
        path: Some(path.to_owned()),
        reason: format!("no private key PEM block ({e})"),
    })?;
    from_private_key_der(&key, Some(path))
}

/// A software key from PKCS#8 DER.
pub fn from_pkcs8_der(der: &[u8]) -> Result<SoftwareKey> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()));
    from_private_key_der(&key, None)
}

fn from_private_key_der(key: &PrivateKeyDer<'_>, path: Option<&Path>) -> Result<SoftwareKey> {
    let parse_err = |reason: String| Error::KeyParse {
        path: path.map(Path::to_owned),
        reason,
    };
    let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(key)
        .map_err(|e| parse_err(e.to_string()))?;
    let spki_der = signing_key
        .public_key()
        .ok_or_else(|| parse_err("the key has no public key encoding".into()))?
        .as_ref()
        .to_vec();
    let kind = KeyKind::from_spki(&spki_der)?;
    Ok(SoftwareKey {
        signing_key,
        spki_der,
        kind,
    })
}

/// RSA private key components (unsigned big-endian), secrets wiped on drop.
pub(crate) struct RsaParts {
    pub n: Vec<u8>,
    pub e: Vec<u8>,
    pub d: Zeroizing<Vec<u8>>,
    pub p: Zeroizing<Vec<u8>>,
    pub q: Zeroizing<Vec<u8>>,
    pub dp: Zeroizing<Vec<u8>>,
    pub dq: Zeroizing<Vec<u8>>,
    pub qinv: Zeroizing<Vec<u8>>,
}

/// A PKCS#8 key taken apart for import into a token.
pub(crate) enum Pkcs8Key {
    Ec {
        kind: KeyKind,
        private: Zeroizing<Vec<u8>>,
        point: Vec<u8>,
    },
    Ed25519 {
        seed: Zeroizing<Vec<u8>>,
        public: Vec<u8>,
    },
    Rsa(RsaParts),
}

/// Parses and validates (with aws-lc-rs) a PKCS#8 private key. Errors never quote the input.
/// The structures are read with RustCrypto's `pkcs8`, `sec1` and `pkcs1` types, which borrow
/// from `input`: the only copies of secret bytes are the `Zeroizing` fields of the result.
pub(crate) fn parse_pkcs8(input: &[u8], path: Option<&Path>) -> Result<Pkcs8Key> {
    use der::Decode;
    let err = |reason: &str| Error::KeyParse {
        path: path.map(Path::to_owned),
        reason: reason.into(),
    };
    let malformed = |_: der::Error| err("malformed PKCS#8 structure");
    let info =
        pkcs8::PrivateKeyInfo::from_der(input).map_err(|_| err("malformed PKCS#8 structure"))?;
    let alg_oid = info.algorithm.oid;

    if alg_oid == oid::EC_PUBLIC_KEY {
        use aws_lc_rs::signature::{
            EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
        };
        let curve = info
            .algorithm
            .parameters_oid()
            .map_err(|_| err("EC key without a named curve"))?;
        let (kind, alg) = if curve == oid::P256 {
            (KeyKind::EcP256, &ECDSA_P256_SHA256_ASN1_SIGNING)
        } else if curve == oid::P384 {
            (KeyKind::EcP384, &ECDSA_P384_SHA384_ASN1_SIGNING)
        } else {
            return Err(Error::UnsupportedKey {
                reason: "EC curve other than P-256/P-384".into(),
            });
        };
        let pair = EcdsaKeyPair::from_pkcs8(alg, input).map_err(|_| err("invalid EC key"))?;
        let ec = sec1::EcPrivateKey::from_der(info.private_key).map_err(malformed)?;
        Ok(Pkcs8Key::Ec {
            kind,
            private: Zeroizing::new(ec.private_key.to_vec()),
            point: pair.public_key().as_ref().to_vec(),
        })
    } else if alg_oid == oid::ED25519 {
        use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(input)
            .map_err(|_| err("invalid Ed25519 key"))?;
        // CurvePrivateKey ::= OCTET STRING (RFC 8410)
        let seed = der::asn1::OctetStringRef::from_der(info.private_key).map_err(malformed)?;
        Ok(Pkcs8Key::Ed25519 {
            seed: Zeroizing::new(seed.as_bytes().to_vec()),
            public: pair.public_key().as_ref().to_vec(),
        })
    } else if alg_oid == oid::RSA_ENCRYPTION {
        aws_lc_rs::rsa::KeyPair::from_pkcs8(input).map_err(|_| err("invalid RSA key"))?;
        let rsa = pkcs1::RsaPrivateKey::from_der(info.private_key).map_err(malformed)?;
        let secret = |v: pkcs1::UintRef<'_>| Zeroizing::new(v.as_bytes().to_vec());
        Ok(Pkcs8Key::Rsa(RsaParts {
            n: rsa.modulus.as_bytes().to_vec(),
            e: rsa.public_exponent.as_bytes().to_vec(),
            d: secret(rsa.private_exponent),
            p: secret(rsa.prime1),
            q: secret(rsa.prime2),
            dp: secret(rsa.exponent1),
            dq: secret(rsa.exponent2),
            qinv: secret(rsa.coefficient),
        }))
    } else {
        Err(Error::UnsupportedKey {
            reason: "PKCS#8 algorithm other than EC, RSA or Ed25519".into(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_generated_keys() {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let ec = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        match parse_pkcs8(ec.as_ref(), None).unwrap() {
            Pkcs8Key::Ec {
                kind,
                private,
                point,
            } => {
                assert_eq!(kind, KeyKind::EcP384);
                assert_eq!(private.len(), 48);
                assert_eq!(point.len(), 97);
            }
            _ => panic!("expected an EC key"),
        }
        let sw = from_pkcs8_der(ec.as_ref()).unwrap();
        assert_eq!(sw.kind, KeyKind::EcP384);

        let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let rsa_der =
            aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'_>>::as_der(&rsa)
                .unwrap();
        match parse_pkcs8(rsa_der.as_ref(), None).unwrap() {
            Pkcs8Key::Rsa(parts) => {
                assert_eq!(parts.n.len(), 256);
                assert_eq!(parts.e, vec![1, 0, 1]);
            }
            _ => panic!("expected an RSA key"),
        }

        let ed = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        assert!(matches!(
            parse_pkcs8(ed.as_ref(), None).unwrap(),
            Pkcs8Key::Ed25519 { .. }
        ));
    }

    #[test]
    fn rejects_garbage_without_echoing_it() {
        let e = parse_pkcs8(b"\x30\x03\x02\x01\x00secret", None)
            .err()
            .unwrap();
        assert!(matches!(e, Error::KeyParse { .. }));
        assert!(!e.to_string().contains("secret"));
    }
}
