//! Key management on the token: generate, import, list, find, delete, and reading a key's
//! attributes into a `KeyInfo`.

use std::sync::Arc;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use zeroize::{Zeroize, Zeroizing};

use super::{from_ck, Token};
use crate::asn1::{self, oid};
use crate::error::{Error, Result};
use crate::keyinfo::{modulus_bits, KeyInfo, KeyKind, KeyOrigin, KeySpec};
use crate::software::{parse_pkcs8, Pkcs8Key};
use crate::uri::Pkcs11Uri;

pub(super) fn find_private(s: &Session, uri: &Pkcs11Uri) -> Result<Vec<ObjectHandle>> {
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(o) = &uri.object {
        template.push(Attribute::Label(o.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    s.find_objects(&template).map_err(from_ck)
}

fn bool_attr(attrs: &[Attribute], want: AttributeType) -> Option<bool> {
    attrs.iter().find_map(|a| match (a, want) {
        (Attribute::Sensitive(b), AttributeType::Sensitive)
        | (Attribute::Extractable(b), AttributeType::Extractable)
        | (Attribute::AlwaysSensitive(b), AttributeType::AlwaysSensitive)
        | (Attribute::NeverExtractable(b), AttributeType::NeverExtractable)
        | (Attribute::Local(b), AttributeType::Local) => Some(*b),
        _ => None,
    })
}

fn bytes_attr(attrs: &[Attribute], want: AttributeType) -> Option<&[u8]> {
    attrs.iter().find_map(|a| match (a, want) {
        (Attribute::Label(v), AttributeType::Label)
        | (Attribute::Id(v), AttributeType::Id)
        | (Attribute::EcParams(v), AttributeType::EcParams)
        | (Attribute::EcPoint(v), AttributeType::EcPoint)
        | (Attribute::Modulus(v), AttributeType::Modulus)
        | (Attribute::PublicExponent(v), AttributeType::PublicExponent) => Some(v.as_slice()),
        _ => None,
    })
}

/// The public half of a key pair: same type and id (and label when that narrows it down), since
/// other tools may label the halves differently but always pair them by id.
fn find_public(
    s: &Session,
    key_type: KeyType,
    label: &[u8],
    id: &[u8],
) -> Result<Option<ObjectHandle>> {
    let base = [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(key_type),
    ];
    let mut attempts: Vec<Vec<Attribute>> = Vec::new();
    if !id.is_empty() {
        let mut t = base.to_vec();
        t.push(Attribute::Id(id.to_vec()));
        let mut with_label = t.clone();
        with_label.push(Attribute::Label(label.to_vec()));
        attempts.push(with_label);
        attempts.push(t);
    } else {
        let mut t = base.to_vec();
        t.push(Attribute::Label(label.to_vec()));
        attempts.push(t);
    }
    for template in attempts {
        let found = s.find_objects(&template).map_err(from_ck)?;
        if let [one] = found.as_slice() {
            return Ok(Some(*one));
        }
    }
    Ok(None)
}

fn ec_params_for(kind: KeyKind) -> Result<Vec<u8>> {
    let curve = match kind {
        KeyKind::EcP384 => oid::P384,
        KeyKind::Ed25519 => oid::ED25519,
        _ => oid::P256,
    };
    asn1::oid_der(curve).map_err(encoding)
}

/// A DER encoding failure (a value out of range for its type); never quotes the value.
fn encoding(e: der::Error) -> Error {
    Error::UnsupportedKey {
        reason: format!("cannot encode the key's attributes ({e})"),
    }
}

/// The SPKI of a key from its public attributes: the public key object when there is one, else
/// the private object's public components (RSA keeps modulus and exponent there).
fn spki_of(
    s: &Session,
    private: ObjectHandle,
    label: &[u8],
    id: &[u8],
) -> Result<(KeyKind, Vec<u8>)> {
    let unsupported = |reason: &str| Error::UnsupportedKey {
        reason: reason.to_owned(),
    };
    let key_type = s
        .get_attributes(private, &[AttributeType::KeyType])
        .map_err(from_ck)?
        .into_iter()
        .find_map(|a| match a {
            Attribute::KeyType(k) => Some(k),
            _ => None,
        })
        .ok_or_else(|| unsupported("private key without CKA_KEY_TYPE"))?;

    let public = find_public(s, key_type, label, id)?;

    if key_type == KeyType::RSA {
        let from = public.unwrap_or(private);
        let attrs = s
            .get_attributes(
                from,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )
            .map_err(from_ck)?;
        let n = bytes_attr(&attrs, AttributeType::Modulus)
            .ok_or_else(|| unsupported("RSA key without a readable modulus"))?;
        let e = bytes_attr(&attrs, AttributeType::PublicExponent)
            .ok_or_else(|| unsupported("RSA key without a readable public exponent"))?;
        Ok((
            KeyKind::Rsa {
                bits: modulus_bits(n),
            },
            asn1::rsa_spki(n, e).map_err(encoding)?,
        ))
    } else if key_type == KeyType::EC || key_type == KeyType::EC_EDWARDS {
        let public = public.ok_or_else(|| unsupported("EC key without a public key object"))?;
        let attrs = s
            .get_attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(from_ck)?;
        let params = bytes_attr(&attrs, AttributeType::EcParams)
            .ok_or_else(|| unsupported("EC public key without CKA_EC_PARAMS"))?;
        let point = bytes_attr(&attrs, AttributeType::EcPoint)
            .and_then(asn1::unwrap_ec_point_any)
            .ok_or_else(|| unsupported("EC public key without a readable CKA_EC_POINT"))?;
        let curve = asn1::named_curve(params);
        if key_type == KeyType::EC_EDWARDS {
            // Modules name the curve by OID or by the printable string "edwards25519".
            let is_25519 = curve == Some(oid::ED25519) || params.ends_with(b"edwards25519");
            if !is_25519 || point.len() != 32 {
                return Err(unsupported("Edwards curve other than Ed25519"));
            }
            return Ok((
                KeyKind::Ed25519,
                asn1::ed25519_spki(point).map_err(encoding)?,
            ));
        }
        match curve {
            Some(c) if c == oid::P256 && point.len() == 65 => {
                Ok((KeyKind::EcP256, asn1::ec_spki(c, point).map_err(encoding)?))
            }
            Some(c) if c == oid::P384 && point.len() == 97 => {
                Ok((KeyKind::EcP384, asn1::ec_spki(c, point).map_err(encoding)?))
            }
            _ => Err(unsupported("EC curve other than P-256/P-384")),
        }
    } else {
        Err(unsupported("key type other than RSA, EC or Ed25519"))
    }
}

pub(super) fn key_info(s: &Session, private: ObjectHandle) -> Result<KeyInfo> {
    let attrs = s
        .get_attributes(
            private,
            &[
                AttributeType::Label,
                AttributeType::Id,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Local,
            ],
        )
        .map_err(from_ck)?;
    let label = bytes_attr(&attrs, AttributeType::Label).unwrap_or_default();
    let id = bytes_attr(&attrs, AttributeType::Id).unwrap_or_default();
    let (kind, spki_der) = spki_of(s, private, label, id)?;
    // Missing booleans are reported as the unsafe value so nothing looks better than it is.
    Ok(KeyInfo {
        label: String::from_utf8_lossy(label).into_owned(),
        id: id.to_vec(),
        kind,
        sensitive: bool_attr(&attrs, AttributeType::Sensitive).unwrap_or(false),
        extractable: bool_attr(&attrs, AttributeType::Extractable).unwrap_or(true),
        always_sensitive: bool_attr(&attrs, AttributeType::AlwaysSensitive).unwrap_or(false),
        never_extractable: bool_attr(&attrs, AttributeType::NeverExtractable).unwrap_or(false),
        origin: match bool_attr(&attrs, AttributeType::Local) {
            Some(true) => KeyOrigin::Generated,
            _ => KeyOrigin::Imported,
        },
        spki_der,
    })
}

/// Attributes every private key we create carries: on the token, behind the PIN, never leaving
/// it, and good for signing only (SoftHSM turns decrypt/unwrap on unless told otherwise).
fn private_template(label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

fn public_template(label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

pub(super) fn new_id(id: Option<&[u8]>) -> Result<Vec<u8>> {
    match id {
        Some(id) if !id.is_empty() => Ok(id.to_vec()),
        _ => {
            let mut id = vec![0u8; 8];
            aws_lc_rs::rand::fill(&mut id).map_err(|_| Error::UnsupportedKey {
                reason: "the system random generator failed".into(),
            })?;
            Ok(id)
        }
    }
}

/// Wipes the secret parts of a template once the token has its copy.
fn zeroize_template(template: &mut [Attribute]) {
    for a in template {
        match a {
            Attribute::Value(v)
            | Attribute::PrivateExponent(v)
            | Attribute::Prime1(v)
            | Attribute::Prime2(v)
            | Attribute::Exponent1(v)
            | Attribute::Exponent2(v)
            | Attribute::Coefficient(v) => v.zeroize(),
            _ => {}
        }
    }
}

impl Token {
    /// Labels and ids each name one key: URIs select by either.
    fn ensure_unused(&self, s: &Session, label: &str, id: &[u8]) -> Result<()> {
        let uri = Pkcs11Uri::private_key(&self.label, label);
        if !find_private(s, &uri)?.is_empty() {
            return Err(Error::KeyExists {
                token: self.label.clone(),
                label: label.to_owned(),
            });
        }
        let by_id = Pkcs11Uri {
            object: None,
            id: Some(id.to_vec()),
            ..uri
        };
        if !find_private(s, &by_id)?.is_empty() {
            return Err(Error::KeyIdExists {
                token: self.label.clone(),
                id_hex: hex::encode(id),
            });
        }
        Ok(())
    }

    /// Generates a key pair on the token: sensitive, non-extractable, sign-only.
    pub fn generate(&self, spec: KeySpec, label: &str, id: Option<&[u8]>) -> Result<KeyInfo> {
        let id = new_id(id)?;
        let (mechanism, mech_type) = match spec {
            KeySpec::EcP256 | KeySpec::EcP384 => (
                Mechanism::EccKeyPairGen,
                cryptoki::mechanism::MechanismType::ECC_KEY_PAIR_GEN,
            ),
            KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096 => (
                Mechanism::RsaPkcsKeyPairGen,
                cryptoki::mechanism::MechanismType::RSA_PKCS_KEY_PAIR_GEN,
            ),
            KeySpec::Ed25519 => (
                Mechanism::EccEdwardsKeyPairGen,
                cryptoki::mechanism::MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
            ),
        };
        if !self.has_mechanism(mech_type) {
            return Err(Error::MechanismUnavailable {
                token: self.label.clone(),
                mechanism: format!("{mech_type} (needed for {spec})"),
            });
        }
        let mut public = public_template(label, &id);
        let private = private_template(label, &id);
        match spec.kind() {
            KeyKind::Rsa { bits } => {
                public.push(Attribute::ModulusBits(Ulong::from(u64::from(bits))));
                public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
            }
            kind => public.push(Attribute::EcParams(ec_params_for(kind)?)),
        }
        self.with_session(|s| {
            self.ensure_unused(s, label, &id)?;
            let (_pub_h, priv_h) = s
                .generate_key_pair(&mechanism, &public, &private)
                .map_err(from_ck)?;
            key_info(s, priv_h)
        })
    }

    /// Imports a PKCS#8 private key as sensitive and non-extractable. The DER (and every copy
    /// of its secret parts) is wiped before returning. CKA_LOCAL stays false, which is how the
    /// token records that it did not generate the key.
    pub fn import_pkcs8(
        &self,
        der: Zeroizing<Vec<u8>>,
        label: &str,
        id: Option<&[u8]>,
    ) -> Result<KeyInfo> {
        let key = parse_pkcs8(&der, None)?;
        drop(der);
        let id = new_id(id)?;
        let mut private = private_template(label, &id);
        private.push(Attribute::Class(ObjectClass::PRIVATE_KEY));
        let mut public = public_template(label, &id);
        public.push(Attribute::Class(ObjectClass::PUBLIC_KEY));
        match &key {
            Pkcs8Key::Ec {
                kind,
                private: d,
                point,
            } => {
                private.push(Attribute::KeyType(KeyType::EC));
                private.push(Attribute::EcParams(ec_params_for(*kind)?));
                private.push(Attribute::Value(d.to_vec()));
                public.push(Attribute::KeyType(KeyType::EC));
                public.push(Attribute::EcParams(ec_params_for(*kind)?));
                public.push(Attribute::EcPoint(
                    asn1::octet_string(point).map_err(encoding)?,
                ));
            }
            Pkcs8Key::Ed25519 { seed, public: pk } => {
                private.push(Attribute::KeyType(KeyType::EC_EDWARDS));
                private.push(Attribute::EcParams(ec_params_for(KeyKind::Ed25519)?));
                private.push(Attribute::Value(seed.to_vec()));
                public.push(Attribute::KeyType(KeyType::EC_EDWARDS));
                public.push(Attribute::EcParams(ec_params_for(KeyKind::Ed25519)?));
                public.push(Attribute::EcPoint(
                    asn1::octet_string(pk).map_err(encoding)?,
                ));
            }
            Pkcs8Key::Rsa(rsa) => {
                private.push(Attribute::KeyType(KeyType::RSA));
                private.push(Attribute::Modulus(rsa.n.clone()));
                private.push(Attribute::PublicExponent(rsa.e.clone()));
                private.push(Attribute::PrivateExponent(rsa.d.to_vec()));
                private.push(Attribute::Prime1(rsa.p.to_vec()));
                private.push(Attribute::Prime2(rsa.q.to_vec()));
                private.push(Attribute::Exponent1(rsa.dp.to_vec()));
                private.push(Attribute::Exponent2(rsa.dq.to_vec()));
                private.push(Attribute::Coefficient(rsa.qinv.to_vec()));
                public.push(Attribute::KeyType(KeyType::RSA));
                public.push(Attribute::Modulus(rsa.n.clone()));
                public.push(Attribute::PublicExponent(rsa.e.clone()));
            }
        }
        drop(key);
        let result = self.with_session(|s| {
            self.ensure_unused(s, label, &id)?;
            let priv_h = s.create_object(&private).map_err(from_ck)?;
            if let Err(e) = s.create_object(&public) {
                // Leave no half-imported key behind.
                let _ = s.destroy_object(priv_h);
                return Err(from_ck(e));
            }
            key_info(s, priv_h)
        });
        zeroize_template(&mut private);
        result
    }

    /// All private keys on the token.
    pub fn list(&self) -> Result<Vec<KeyInfo>> {
        self.with_session(|s| {
            let handles = s
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .map_err(from_ck)?;
            let mut keys = Vec::with_capacity(handles.len());
            for h in handles {
                match key_info(s, h) {
                    Ok(k) => keys.push(k),
                    // Keys of other types may share the token; list what we can use.
                    Err(Error::UnsupportedKey { reason }) => {
                        tracing::debug!(token = %self.label, %reason, "skipping key");
                    }
                    Err(e) => return Err(e),
                }
            }
            keys.sort_by(|a, b| a.label.cmp(&b.label).then(a.id.cmp(&b.id)));
            Ok(keys)
        })
    }

    /// The private key `uri` names, with its public half.
    pub fn find(&self, uri: &Pkcs11Uri) -> Result<KeyInfo> {
        self.with_private_key(uri, key_info)
    }

    /// Deletes the private key `uri` names and its public key object.
    pub fn delete(&self, uri: &Pkcs11Uri) -> Result<()> {
        self.check_uri(uri)?;
        self.forget_handles();
        self.forget_key(uri);
        self.with_session(|s| {
            let handles = find_private(s, uri)?;
            let private = match handles.as_slice() {
                [] => {
                    return Err(Error::KeyNotFound {
                        uri: uri.to_string(),
                    })
                }
                [h] => *h,
                many => {
                    return Err(Error::AmbiguousKey {
                        uri: uri.to_string(),
                        count: many.len(),
                    })
                }
            };
            let attrs = s
                .get_attributes(private, &[AttributeType::Label, AttributeType::Id])
                .map_err(from_ck)?;
            let label = bytes_attr(&attrs, AttributeType::Label)
                .unwrap_or_default()
                .to_vec();
            let id = bytes_attr(&attrs, AttributeType::Id)
                .unwrap_or_default()
                .to_vec();
            let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
            if !id.is_empty() {
                template.push(Attribute::Id(id));
            }
            template.push(Attribute::Label(label));
            let publics = s.find_objects(&template).map_err(from_ck)?;
            s.destroy_object(private).map_err(from_ck)?;
            for p in publics {
                s.destroy_object(p).map_err(from_ck)?;
            }
            Ok(())
        })
    }

    /// A rustls signing key for the private key `uri` names.
    pub fn signing_key(
        self: &Arc<Self>,
        uri: &Pkcs11Uri,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>> {
        Ok(Arc::new(super::TokenSigningKey::new(self, uri)?))
    }

    /// An rcgen signing key (for CSRs and certificates) for the private key `uri` names.
    pub fn rcgen_key(self: &Arc<Self>, uri: &Pkcs11Uri) -> Result<super::TokenRcgenKey> {
        super::TokenRcgenKey::new(self, uri)
    }
}
