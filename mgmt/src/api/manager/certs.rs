//! Stored certificates: listing, reading, storing (a rotation when bound) and deleting (refused
//! while bound). Every stored chain is checked against its key first.

use std::collections::BTreeSet;
use std::time::SystemTime;

use tlsgate_keystore::cert::{fmt_time, ChainReport};

use super::{now_unix, unix, CertView, Inner, Manager, PutCert};
use crate::api::error::ApiError;
use crate::snapshot::Scope;
use crate::state::{check_name, StoredCert};

impl Manager {
    pub fn list_certs(&self) -> Vec<Result<CertView, (String, ApiError)>> {
        let inner = self.lock();
        let now = SystemTime::now();
        inner
            .state
            .certs
            .values()
            .map(|c| {
                self.cert_view(&inner, c, now)
                    .map_err(|e| (c.id.clone(), e))
            })
            .collect()
    }

    pub fn get_cert(&self, id: &str) -> Result<CertView, ApiError> {
        let inner = self.lock();
        let c = inner
            .state
            .certs
            .get(id)
            .ok_or_else(|| cert_not_found(id))?;
        self.cert_view(&inner, c, SystemTime::now())
    }

    fn cert_view(
        &self,
        inner: &Inner,
        c: &StoredCert,
        now: SystemTime,
    ) -> Result<CertView, ApiError> {
        let cred = self.check_cert(&inner.config, c, now)?;
        Ok(cert_view(
            c,
            &cred.report,
            cred.chain.certs.len(),
            inner.state.listeners_using(&c.id),
        ))
    }

    /// Stores (or replaces: a rotation when bound) a certificate chain.
    pub fn put_cert(&self, id: &str, req: PutCert) -> Result<CertView, ApiError> {
        check_name("certificate", id)
            .map_err(|e| ApiError::invalid("name_invalid", format!("{e:#}")))?;
        let mut inner = self.lock();
        let stored = StoredCert {
            id: id.to_owned(),
            key: req.key,
            chain_pem: req.chain_pem,
            updated_unix: now_unix(),
        };
        // Checked on its own first so the answer names the certificate problem even when the
        // certificate is not bound.
        let cred = self.check_cert(&inner.config, &stored, SystemTime::now())?;
        let (chain, report) = (&cred.chain, &cred.report);
        // Store a normalised chain: only the CERTIFICATE blocks.
        let stored = StoredCert {
            chain_pem: chain.to_pem(),
            ..stored
        };
        let mut new_state = inner.state.clone();
        new_state
            .certs
            .insert(id.to_owned(), std::sync::Arc::new(stored.clone()));
        let users: BTreeSet<String> = inner.state.listeners_using(id).into_iter().collect();
        self.change(&mut inner, new_state, Scope::Listeners(&users), |s| {
            s.put_cert(&stored)
        })?;
        Ok(cert_view(
            &stored,
            report,
            chain.certs.len(),
            inner.state.listeners_using(id),
        ))
    }

    pub fn delete_cert(&self, id: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if !inner.state.certs.contains_key(id) {
            return Err(cert_not_found(id));
        }
        let mut users = inner.state.listeners_using(id);
        users.extend(super::acme::acme_listeners(&inner.config, id));
        if !users.is_empty() {
            return Err(ApiError::conflict(
                "certificate_in_use",
                format!(
                    "certificate {id:?} is bound to listeners {}; change their bindings first",
                    users.join(", ")
                ),
            ));
        }
        let mut new_state = inner.state.clone();
        new_state.certs.remove(id);
        self.change(
            &mut inner,
            new_state,
            Scope::Listeners(&BTreeSet::new()),
            |s| s.delete_cert(id),
        )
    }
}

pub(super) fn cert_not_found(id: &str) -> ApiError {
    ApiError::not_found("certificate_not_found", format!("no certificate {id:?}"))
}

fn cert_view(c: &StoredCert, r: &ChainReport, len: usize, bound_to: Vec<String>) -> CertView {
    CertView {
        id: c.id.clone(),
        key: c.key.clone(),
        subject: r.subject.clone(),
        issuer: r.issuer.clone(),
        sans: r.sans.clone(),
        serial: r.serial_hex.clone(),
        not_before: fmt_time(r.not_before),
        not_after: fmt_time(r.not_after),
        not_after_unix: unix(r.not_after),
        chain_not_after: fmt_time(r.chain_not_after),
        fingerprint_sha256: r.fingerprint_sha256.clone(),
        chain_length: len as u64,
        updated_unix: c.updated_unix,
        bound_to,
    }
}
