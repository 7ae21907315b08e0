//! rcgen's remote-key trait over a token key, so CSRs and certificates can be signed by it.

use std::sync::Arc;

use super::signer::{TokenAlg, TokenKey};
use super::Token;
use crate::asn1;
use crate::error::{Error, Result};
use crate::keyinfo::KeyKind;
use crate::uri::Pkcs11Uri;

/// A token key usable wherever rcgen wants a `SigningKey` (CSRs, lab certificates).
#[derive(Debug, Clone)]
pub struct TokenRcgenKey {
    key: Arc<TokenKey>,
    /// The SPKI's BIT STRING contents: what rcgen calls the key's `der_bytes`.
    public_key: Vec<u8>,
}

impl TokenRcgenKey {
    pub(crate) fn new(token: &Arc<Token>, uri: &Pkcs11Uri) -> Result<TokenRcgenKey> {
        let key = TokenKey::new(token, uri)?;
        let public_key = asn1::parse_spki(&key.spki_der)
            .ok_or_else(|| Error::UnsupportedKey {
                reason: "malformed public key".into(),
            })?
            .public_key
            .to_vec();
        Ok(TokenRcgenKey {
            key: Arc::new(key),
            public_key,
        })
    }

    pub fn kind(&self) -> KeyKind {
        self.key.kind
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.key.spki_der
    }

    fn alg(&self) -> TokenAlg {
        match self.key.kind {
            KeyKind::EcP256 => TokenAlg::EcdsaSha256,
            KeyKind::EcP384 => TokenAlg::EcdsaSha384,
            KeyKind::Rsa { .. } => TokenAlg::RsaPkcs1Sha256,
            KeyKind::Ed25519 => TokenAlg::Ed25519,
        }
    }
}

impl rcgen::PublicKeyData for TokenRcgenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.key.kind {
            KeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

impl rcgen::SigningKey for TokenRcgenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign(self.alg(), msg).map_err(|e| {
            tracing::warn!(key = %self.key.uri, error = %e, "token signature for rcgen failed");
            rcgen::Error::RemoteKeyError
        })
    }
}
