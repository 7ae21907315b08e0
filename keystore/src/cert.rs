//! Certificate chains: parsing, the checks an upload must pass (key match, order, signatures,
//! validity), and the rustls `CertifiedKey`. Errors name the certificate (index, subject).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, SigningKey};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::asn1;
use crate::error::{Error, Result};
use crate::keyinfo::KeyKind;

pub use crate::error::{fmt_time, CertError};

fn system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

/// A certificate chain, leaf first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertChain {
    pub certs: Vec<CertificateDer<'static>>,
}

/// What a valid chain's leaf says, for listings and expiry metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex SHA-256 over the leaf's DER.
    pub fingerprint_sha256: String,
    /// The earliest `not_after` over the whole chain: when this chain stops working.
    pub chain_not_after: SystemTime,
}

fn parse(index: usize, der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((_, _)) => Err(CertError::Parse {
            index,
            reason: "trailing bytes after the certificate".into(),
        }),
        Err(e) => Err(CertError::Parse {
            index,
            reason: e.to_string(),
        }),
    }
}

impl CertChain {
    /// Parses every `CERTIFICATE` block (other blocks are ignored) and checks each parses.
    pub fn from_pem(bytes: &[u8]) -> Result<CertChain, CertError> {
        let certs = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Pem {
                reason: e.to_string(),
            })?;
        CertChain::from_der(certs)
    }

    pub fn from_der(certs: Vec<CertificateDer<'static>>) -> Result<CertChain, CertError> {
        if certs.is_empty() {
            return Err(CertError::Empty);
        }
        for (i, c) in certs.iter().enumerate() {
            parse(i, c)?;
        }
        Ok(CertChain { certs })
    }

    pub fn from_pem_file(path: &Path) -> Result<CertChain> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(CertChain::from_pem(&bytes)?)
    }

    pub fn to_pem(&self) -> String {
        self.certs
            .iter()
            .map(|c| crate::keyinfo::pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// Checks the chain against the key's SPKI at time `now`: the leaf is for this key, each
    /// certificate is issued (names and signature) by the next, and all are within validity.
    /// The leaf's SubjectPublicKeyInfo (DER).
    pub fn leaf_spki(&self) -> Result<Vec<u8>, CertError> {
        let leaf = self.certs.first().ok_or(CertError::Empty)?;
        Ok(parse(0, leaf)?.public_key().raw.to_vec())
    }

    pub fn validate(&self, spki_der: &[u8], now: SystemTime) -> Result<ChainReport, CertError> {
        let parsed = self
            .certs
            .iter()
            .enumerate()
            .map(|(i, c)| parse(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let (leaf, leaf_der) = match (parsed.first(), self.certs.first()) {
            (Some(p), Some(d)) => (p, d.as_ref()),
            _ => return Err(CertError::Empty),
        };
        let subject = |c: &X509Certificate<'_>| c.subject().to_string();

        if !same_key(leaf.public_key().raw, spki_der) {
            return Err(CertError::KeyMismatch {
                subject: subject(leaf),
            });
        }
        let mut chain_not_after = None::<SystemTime>;
        for (i, cert) in parsed.iter().enumerate() {
            let not_before = system_time(cert.validity().not_before.timestamp());
            let not_after = system_time(cert.validity().not_after.timestamp());
            if now < not_before {
                return Err(CertError::NotYetValid {
                    index: i,
                    subject: subject(cert),
                    not_before,
                });
            }
            if now > not_after {
                return Err(CertError::Expired {
                    index: i,
                    subject: subject(cert),
                    not_after,
                });
            }
            chain_not_after = Some(chain_not_after.map_or(not_after, |t| t.min(not_after)));
            if let Some(issuer) = parsed.get(i + 1) {
                if cert.issuer().as_raw() != issuer.subject().as_raw() {
                    return Err(CertError::ChainOrder {
                        index: i,
                        subject: subject(cert),
                        expected_issuer: cert.issuer().to_string(),
                        next_subject: subject(issuer),
                    });
                }
                verify_signature(i, cert, issuer)?;
            }
        }
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = leaf.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(d) => sans.push((*d).to_owned()),
                    GeneralName::IPAddress(ip) => sans.push(fmt_ip(ip)),
                    GeneralName::RFC822Name(m) => sans.push(format!("email:{m}")),
                    GeneralName::URI(u) => sans.push(format!("uri:{u}")),
                    _ => {}
                }
            }
        }
        let not_after = system_time(leaf.validity().not_after.timestamp());
        Ok(ChainReport {
            subject: subject(leaf),
            issuer: leaf.issuer().to_string(),
            sans,
            serial_hex: hex::encode(leaf.raw_serial()),
            not_before: system_time(leaf.validity().not_before.timestamp()),
            not_after,
            fingerprint_sha256: hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                leaf_der,
            )),
            chain_not_after: chain_not_after.unwrap_or(not_after),
        })
    }
}

fn fmt_ip(ip: &[u8]) -> String {
    match ip.len() {
        4 => {
            let b: [u8; 4] = [ip[0], ip[1], ip[2], ip[3]];
            std::net::Ipv4Addr::from(b).to_string()
        }
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(ip);
            std::net::Ipv6Addr::from(b).to_string()
        }
        _ => format!("ip:{}", hex::encode(ip)),
    }
}

/// Same algorithm and same public key bits (parameter encodings may legitimately differ, e.g.
/// an absent vs NULL RSA parameter).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    match (asn1::parse_spki(a), asn1::parse_spki(b)) {
        (Some(a), Some(b)) => a.algorithm == b.algorithm && a.public_key == b.public_key,
        _ => a == b,
    }
}

fn verify_signature(
    index: usize,
    cert: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
) -> Result<(), CertError> {
    use aws_lc_rs::signature as sig;
    let subject = cert.subject().to_string();
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    let unsupported = || CertError::UnsupportedSignature {
        index,
        subject: subject.clone(),
        algorithm: oid.clone(),
    };
    let issuer_kind = KeyKind::from_spki(issuer.public_key().raw).map_err(|_| unsupported())?;
    let alg: &'static dyn sig::VerificationAlgorithm = match (oid.as_str(), issuer_kind) {
        ("1.2.840.10045.4.3.2", KeyKind::EcP256) => &sig::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", KeyKind::EcP256) => &sig::ECDSA_P256_SHA384_ASN1,
        ("1.2.840.10045.4.3.2", KeyKind::EcP384) => &sig::ECDSA_P384_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", KeyKind::EcP384) => &sig::ECDSA_P384_SHA384_ASN1,
        ("1.2.840.113549.1.1.11", KeyKind::Rsa { .. }) => &sig::RSA_PKCS1_2048_8192_SHA256,
        ("1.2.840.113549.1.1.12", KeyKind::Rsa { .. }) => &sig::RSA_PKCS1_2048_8192_SHA384,
        ("1.2.840.113549.1.1.13", KeyKind::Rsa { .. }) => &sig::RSA_PKCS1_2048_8192_SHA512,
        ("1.3.101.112", KeyKind::Ed25519) => &sig::ED25519,
        _ => return Err(unsupported()),
    };
    let key = sig::UnparsedPublicKey::new(alg, &issuer.public_key().subject_public_key.data);
    key.verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .map_err(|_| CertError::BadSignature { index, subject })
}

/// The rustls `CertifiedKey` for a chain and a key, refusing a chain for another key.
pub fn certified_key(chain: &CertChain, key: Arc<dyn SigningKey>) -> Result<Arc<CertifiedKey>> {
    let ck = CertifiedKey::new(chain.certs.clone(), key);
    match ck.keys_match() {
        Ok(()) => Ok(Arc::new(ck)),
        // A key that cannot report its public half cannot be checked here; validate() can.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(ck)),
        Err(_) => {
            let subject = chain
                .certs
                .first()
                .and_then(|c| parse(0, c).ok().map(|c| c.subject().to_string()))
                .unwrap_or_default();
            Err(CertError::KeyMismatch { subject }.into())
        }
    }
}
