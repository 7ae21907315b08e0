//! Secret (symmetric) keys on the token, used only to compute HMAC-SHA256 through PKCS#11.
//!
//! A secret key for deriving session-ticket keys is a `CKK_GENERIC_SECRET` of 32 bytes,
//! generated on the token, sensitive, non-extractable, and good for `CKA_SIGN` only (no encrypt,
//! decrypt, wrap, unwrap, derive or verify). The only thing tlsgate ever does with it is
//! `C_Sign` with `CKM_SHA256_HMAC`: the secret never leaves the token, only MACs of inputs we
//! choose come out.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use zeroize::Zeroizing;

use super::{from_ck, Token};
use crate::error::{Error, Result};
use crate::uri::{ObjectType, Pkcs11Uri};

/// Length of a generated secret, in bytes (the HMAC-SHA256 block-size-safe key length).
pub const SECRET_KEY_BYTES: usize = 32;

/// Length of an HMAC-SHA256 output, in bytes.
pub const HMAC_SHA256_BYTES: usize = 32;

/// What the keystore tells about a secret key: never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID.
    pub id: Vec<u8>,
    /// CKA_KEY_TYPE as a name (`generic-secret`, `sha256-hmac`, or the raw number).
    pub key_type: String,
    /// CKA_VALUE_LEN in bytes, when the token says.
    pub value_len: Option<u64>,
    /// CKA_SENSITIVE (false when unreadable: nothing looks better than it is).
    pub sensitive: bool,
    /// CKA_EXTRACTABLE (true when unreadable).
    pub extractable: bool,
    /// CKA_SIGN.
    pub sign: bool,
    /// Any of CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_DERIVE, CKA_VERIFY (true when
    /// unreadable).
    pub other_uses: bool,
}

impl SecretInfo {
    /// The URI that names this secret on `token`.
    pub fn uri(&self, token: &str) -> Pkcs11Uri {
        Pkcs11Uri {
            token: Some(token.to_owned()),
            object: Some(self.label.clone()),
            object_type: Some(ObjectType::SecretKey),
            ..Pkcs11Uri::default()
        }
    }
}

fn find_secret(s: &Session, uri: &Pkcs11Uri) -> Result<Vec<ObjectHandle>> {
    let mut template = vec![Attribute::Class(ObjectClass::SECRET_KEY)];
    if let Some(o) = &uri.object {
        template.push(Attribute::Label(o.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    s.find_objects(&template).map_err(from_ck)
}

fn one_secret(s: &Session, uri: &Pkcs11Uri) -> Result<ObjectHandle> {
    match find_secret(s, uri)?.as_slice() {
        [] => Err(Error::KeyNotFound {
            uri: uri.to_string(),
        }),
        [h] => Ok(*h),
        many => Err(Error::AmbiguousKey {
            uri: uri.to_string(),
            count: many.len(),
        }),
    }
}

fn secret_info(s: &Session, h: ObjectHandle) -> Result<SecretInfo> {
    let attrs = s
        .get_attributes(
            h,
            &[
                AttributeType::Label,
                AttributeType::Id,
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Sign,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Derive,
                AttributeType::Verify,
            ],
        )
        .map_err(from_ck)?;
    let mut info = SecretInfo {
        label: String::new(),
        id: Vec::new(),
        key_type: "unknown".into(),
        value_len: None,
        sensitive: false,
        extractable: true,
        sign: false,
        other_uses: false,
    };
    let mut seen_uses = 0;
    for a in attrs {
        match a {
            Attribute::Label(v) => info.label = String::from_utf8_lossy(&v).into_owned(),
            Attribute::Id(v) => info.id = v,
            Attribute::KeyType(k) => {
                info.key_type = if k == KeyType::GENERIC_SECRET {
                    "generic-secret".into()
                } else if k == KeyType::SHA256_HMAC {
                    "sha256-hmac".into()
                } else {
                    format!("{k}")
                }
            }
            Attribute::ValueLen(n) => info.value_len = Some(u64::from(n)),
            Attribute::Sensitive(b) => info.sensitive = b,
            Attribute::Extractable(b) => info.extractable = b,
            Attribute::Sign(b) => info.sign = b,
            Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b)
            | Attribute::Derive(b)
            | Attribute::Verify(b) => {
                seen_uses += 1;
                info.other_uses |= b;
            }
            _ => {}
        }
    }
    if seen_uses < 6 {
        info.other_uses = true;
    }
    Ok(info)
}

/// A URI for a secret key must not say it names something else.
fn check_secret_uri(token: &Token, uri: &Pkcs11Uri) -> Result<()> {
    token.check_uri(uri)?;
    match uri.object_type {
        None | Some(ObjectType::SecretKey) => Ok(()),
        Some(other) => Err(Error::UnsupportedKey {
            reason: format!(
                "{uri} has type={other}: a ticket secret is a secret key (type=secret-key)"
            ),
        }),
    }
}

impl Token {
    /// Generates a 32-byte generic secret on the token for HMAC-SHA256: sensitive,
    /// non-extractable, private, sign-only.
    pub fn generate_hmac_secret(&self, label: &str, id: Option<&[u8]>) -> Result<SecretInfo> {
        for m in [
            MechanismType::GENERIC_SECRET_KEY_GEN,
            MechanismType::SHA256_HMAC,
        ] {
            if !self.has_mechanism(m) {
                return Err(Error::MechanismUnavailable {
                    token: self.label.clone(),
                    mechanism: format!("{m} (needed for an HMAC ticket secret)"),
                });
            }
        }
        let id = super::objects::new_id(id)?;
        let uri = Pkcs11Uri {
            token: Some(self.label.clone()),
            object: Some(label.to_owned()),
            ..Pkcs11Uri::default()
        };
        let template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(Ulong::from(SECRET_KEY_BYTES as u64)),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Verify(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        self.with_session(|s| {
            if !find_secret(s, &uri)?.is_empty() {
                return Err(Error::KeyExists {
                    token: self.label.clone(),
                    label: label.to_owned(),
                });
            }
            let by_id = Pkcs11Uri {
                object: None,
                id: Some(id.clone()),
                ..uri.clone()
            };
            if !find_secret(s, &by_id)?.is_empty() {
                return Err(Error::KeyIdExists {
                    token: self.label.clone(),
                    id_hex: hex::encode(&id),
                });
            }
            let h = s
                .generate_key(&Mechanism::GenericSecretKeyGen, &template)
                .map_err(from_ck)?;
            secret_info(s, h)
        })
    }

    /// The secret key `uri` names (attributes only, never the value).
    pub fn find_secret(&self, uri: &Pkcs11Uri) -> Result<SecretInfo> {
        check_secret_uri(self, uri)?;
        self.with_session(|s| {
            let h = one_secret(s, uri)?;
            secret_info(s, h)
        })
    }

    /// All secret keys on the token.
    pub fn list_secrets(&self) -> Result<Vec<SecretInfo>> {
        self.with_session(|s| {
            let handles = s
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .map_err(from_ck)?;
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                out.push(secret_info(s, h)?);
            }
            out.sort_by(|a, b| a.label.cmp(&b.label).then(a.id.cmp(&b.id)));
            Ok(out)
        })
    }

    /// Deletes the secret key `uri` names.
    pub fn delete_secret(&self, uri: &Pkcs11Uri) -> Result<()> {
        check_secret_uri(self, uri)?;
        self.with_session(|s| {
            let h = one_secret(s, uri)?;
            s.destroy_object(h).map_err(from_ck)
        })
    }

    /// HMAC-SHA256 of `data` under the secret key `uri` names, computed by the token
    /// (`C_Sign` with `CKM_SHA256_HMAC`). The object is looked up on each call: callers derive
    /// rarely (once per ticket-key epoch) and a fresh lookup survives the key being re-created.
    pub fn hmac_sha256(
        &self,
        uri: &Pkcs11Uri,
        data: &[u8],
    ) -> Result<Zeroizing<[u8; HMAC_SHA256_BYTES]>> {
        check_secret_uri(self, uri)?;
        let mac = self.with_session(|s| {
            let h = one_secret(s, uri)?;
            s.sign(&Mechanism::Sha256Hmac, h, data).map_err(from_ck)
        })?;
        let mac = Zeroizing::new(mac);
        let mut out = Zeroizing::new([0u8; HMAC_SHA256_BYTES]);
        if mac.len() != HMAC_SHA256_BYTES {
            return Err(Error::Pkcs11 {
                function: "C_Sign",
                rv: format!(
                    "CKM_SHA256_HMAC returned {} bytes, expected {HMAC_SHA256_BYTES}",
                    mac.len()
                ),
            });
        }
        out.copy_from_slice(&mac);
        Ok(out)
    }
}
