//! Keys on the token: listing, generating, importing (PKCS#8 in secret memory), deleting (refused
//! while a bound certificate uses the key) and CSRs.

use tlsgate_keystore::keyref::KeyRef;
use tlsgate_keystore::secret::SecretBuf;
use tlsgate_keystore::{KeyInfo, KeySpec};
use zeroize::Zeroizing;

use super::{CsrRequest, GenerateKey, Inner, KeyView, Manager};
use crate::api::error::{key_error, ApiError};

impl Manager {
    pub fn list_keys(&self) -> Result<Vec<KeyView>, ApiError> {
        let token = self.token()?;
        let keys = token.list().map_err(|e| key_error(&e))?;
        let inner = self.lock();
        Ok(keys
            .iter()
            .map(|k| self.key_view(&inner, k, token.label()))
            .collect())
    }

    fn key_view(&self, inner: &Inner, k: &KeyInfo, token: &str) -> KeyView {
        KeyView {
            label: k.label.clone(),
            id: hex::encode(&k.id),
            kind: k.kind.to_string(),
            uri: k.uri(token).to_string(),
            sensitive: k.sensitive,
            extractable: k.extractable,
            always_sensitive: k.always_sensitive,
            never_extractable: k.never_extractable,
            origin: k.origin.to_string(),
            spki_sha256: k.fingerprint_sha256(),
            used_by: self.key_users(inner, &k.label, false),
        }
    }

    /// Certificates that use the key labelled `label`: stored ones (all, or only those a
    /// binding names) and the configuration file's.
    fn key_users(&self, inner: &Inner, label: &str, bound_only: bool) -> Vec<String> {
        let names_label = |key: &str| -> bool {
            match self.key_ref(&inner.config, key) {
                Ok(KeyRef::Pkcs11(uri)) => uri.object.as_deref() == Some(label),
                _ => false,
            }
        };
        let mut users: Vec<String> = inner
            .state
            .certs
            .values()
            .filter(|c| names_label(&c.key))
            .filter(|c| {
                !bound_only
                    || !inner.state.listeners_using(&c.id).is_empty()
                    || !super::acme::acme_listeners(&inner.config, &c.id).is_empty()
            })
            .map(|c| c.id.clone())
            .collect();
        for l in &inner.config.listeners {
            if inner.state.bindings.contains_key(&l.name) && bound_only {
                continue;
            }
            if l.certificates.iter().any(|c| names_label(&c.key)) {
                users.push(format!("config:{}", l.name));
            }
        }
        users
    }

    pub fn generate_key(&self, req: &GenerateKey) -> Result<KeyView, ApiError> {
        let token = self.token()?;
        let spec: KeySpec = req.kind.parse().map_err(|e: tlsgate_keystore::Error| {
            ApiError::invalid("key_type_invalid", e.to_string())
        })?;
        check_label(&req.label)?;
        let id = parse_id(req.id.as_deref())?;
        let info = token
            .generate(spec, &req.label, id.as_deref())
            .map_err(|e| key_error(&e))?;
        let inner = self.lock();
        Ok(self.key_view(&inner, &info, token.label()))
    }

    /// Imports a PKCS#8 key (PEM). The PEM and the DER decoded from it live only in secret
    /// memory (wiped, out of core dumps) and are never stored or echoed.
    pub fn import_key(
        &self,
        label: &str,
        id: Option<&str>,
        pkcs8_pem: &SecretBuf,
    ) -> Result<KeyView, ApiError> {
        let token = self.token()?;
        check_label(label)?;
        let id = parse_id(id)?;
        let der = tlsgate_keystore::secret::pkcs8_der_from_pem(pkcs8_pem.as_bytes())
            .map(|d| Zeroizing::new(d.as_bytes().to_vec()))
            .ok_or_else(|| {
                ApiError::invalid(
                    "key_pem_invalid",
                    "pkcs8_pem holds no PKCS#8 private key (a `-----BEGIN PRIVATE KEY-----` block)",
                )
            })?;
        let info = token
            .import_pkcs8(der, label, id.as_deref())
            .map_err(|e| key_error(&e))?;
        let inner = self.lock();
        Ok(self.key_view(&inner, &info, token.label()))
    }

    pub fn delete_key(&self, label: &str) -> Result<(), ApiError> {
        let token = self.token()?;
        let uri = self.label_uri(label)?;
        // Held across the delete so no binding can start using the key meanwhile.
        let inner = self.lock();
        let users = self.key_users(&inner, label, true);
        if !users.is_empty() {
            return Err(ApiError::conflict(
                "key_in_use",
                format!(
                    "key {label:?} is used by bound certificates: {}; unbind them first",
                    users.join(", ")
                ),
            ));
        }
        token.delete(&uri).map_err(|e| key_error(&e))
    }

    pub fn csr(&self, label: &str, req: &CsrRequest) -> Result<String, ApiError> {
        let token = self.token()?;
        let uri = self.label_uri(label)?;
        if req.common_name.is_empty() {
            return Err(ApiError::bad_request("common_name must not be empty"));
        }
        let key = token.rcgen_key(&uri).map_err(|e| key_error(&e))?;
        tlsgate_keystore::csr::create_csr(&key, &req.common_name, &req.sans)
            .map_err(|e| key_error(&e))
    }
}

pub(crate) fn check_label(label: &str) -> Result<(), ApiError> {
    if label.is_empty() || label.chars().count() > 64 || label.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid(
            "label_invalid",
            "a key label needs 1 to 64 printable characters",
        ));
    }
    Ok(())
}

pub(crate) fn parse_id(id: Option<&str>) -> Result<Option<Vec<u8>>, ApiError> {
    match id {
        None => Ok(None),
        Some(h) => match hex::decode(h) {
            Ok(b) if !b.is_empty() => Ok(Some(b)),
            _ => Err(ApiError::invalid(
                "key_id_invalid",
                format!("id {h:?} is not non-empty hex (e.g. \"01a2\")"),
            )),
        },
    }
}
