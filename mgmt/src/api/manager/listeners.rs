//! Listeners as the API sees them: their bindings (which stored certificates a listener serves
//! instead of the configuration file's) and their CRLs.

use std::time::SystemTime;

use rustls_pki_types::CertificateRevocationListDer;
use tlsgate_keystore::cert::fmt_time;

use super::certs::cert_not_found;
use super::{CrlView, Inner, ListenerView, Manager, PutBinding, PutCrl};
use crate::api::error::ApiError;
use crate::snapshot::Scope;
use crate::state::{Binding, StoredCrl};

impl Manager {
    pub(super) fn check_listener(inner: &Inner, listener: &str) -> Result<(), ApiError> {
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
        let bound = self.bound.lock().clone();
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
                    config_certificates: l.certificates.len() as u64,
                    source: if binding.is_some() {
                        super::CertSource::Api
                    } else {
                        super::CertSource::Config
                    },
                    binding,
                    crls: inner
                        .state
                        .crls
                        .get(&l.name)
                        .map(|v| v.iter().filter_map(|c| crl_view(c).ok()).collect())
                        .unwrap_or_default(),
                    client_ca: inner
                        .state
                        .client_cas
                        .get(&l.name)
                        .and_then(|c| super::client_ca::client_ca_view(c).ok()),
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
        let binding = Binding::new(listener.to_owned(), req.certificates);
        let mut new_state = inner.state.clone();
        new_state
            .bindings
            .insert(listener.to_owned(), std::sync::Arc::new(binding.clone()));
        self.change(
            &mut inner,
            new_state,
            Scope::Listeners(&one(listener)),
            |s| s.put_binding(&binding),
        )
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
        self.change(
            &mut inner,
            new_state,
            Scope::Listeners(&one(listener)),
            |s| s.delete_binding(listener),
        )
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
        self.change(
            &mut inner,
            new_state,
            Scope::Listeners(&one(listener)),
            |s| s.put_crls(listener, &list),
        )?;
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
        self.change(
            &mut inner,
            new_state,
            Scope::Listeners(&one(listener)),
            |s| s.put_crls(listener, &list),
        )
    }
}

/// The scope of a change to one listener.
pub(super) fn one(listener: &str) -> std::collections::BTreeSet<String> {
    std::iter::once(listener.to_owned()).collect()
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
        revoked: crl.iter_revoked_certificates().count() as u64,
    })
}

pub(crate) fn pem_encode_crl(der: &[u8]) -> String {
    tlsgate_keystore::keyinfo::pem_encode("X509 CRL", der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tlsgate_keystore::cert::CertChain;

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
