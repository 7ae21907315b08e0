//! rustls signing with token keys. Hashing happens in process (aws-lc-rs); the token sees only
//! the digest (ECDSA, RSA) or the message (Ed25519). Failures reach rustls as
//! `Error::General`, never as a panic; failures are logged at most once per interval with their
//! count, naming the PKCS#11 function and CKR of the latest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use super::Token;
use crate::asn1;
use crate::error::{Error, Result};
use crate::keyinfo::KeyKind;
use crate::uri::Pkcs11Uri;

/// DigestInfo prefixes (RFC 8017 §9.2 note 1) for CKM_RSA_PKCS over an in-process hash: the
/// DER of `SEQUENCE { AlgorithmIdentifier { sha-N, NULL }, OCTET STRING (N/8 bytes) }` up to the
/// digest itself (a fixed, published byte string per hash).
const DIGEST_INFO_SHA256: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
const DIGEST_INFO_SHA384: &[u8] = &[
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];
const DIGEST_INFO_SHA512: &[u8] = &[
    0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05,
    0x00, 0x04, 0x40,
];

/// A signature algorithm as the keystore performs it on a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenAlg {
    EcdsaSha256,
    EcdsaSha384,
    RsaPssSha256,
    RsaPssSha384,
    RsaPssSha512,
    RsaPkcs1Sha256,
    RsaPkcs1Sha384,
    RsaPkcs1Sha512,
    Ed25519,
}

impl TokenAlg {
    fn from_scheme(s: SignatureScheme) -> Option<TokenAlg> {
        Some(match s {
            SignatureScheme::ECDSA_NISTP256_SHA256 => TokenAlg::EcdsaSha256,
            SignatureScheme::ECDSA_NISTP384_SHA384 => TokenAlg::EcdsaSha384,
            SignatureScheme::RSA_PSS_SHA256 => TokenAlg::RsaPssSha256,
            SignatureScheme::RSA_PSS_SHA384 => TokenAlg::RsaPssSha384,
            SignatureScheme::RSA_PSS_SHA512 => TokenAlg::RsaPssSha512,
            SignatureScheme::RSA_PKCS1_SHA256 => TokenAlg::RsaPkcs1Sha256,
            SignatureScheme::RSA_PKCS1_SHA384 => TokenAlg::RsaPkcs1Sha384,
            SignatureScheme::RSA_PKCS1_SHA512 => TokenAlg::RsaPkcs1Sha512,
            SignatureScheme::ED25519 => TokenAlg::Ed25519,
            _ => return None,
        })
    }

    fn mechanism_type(self) -> MechanismType {
        match self {
            TokenAlg::EcdsaSha256 | TokenAlg::EcdsaSha384 => MechanismType::ECDSA,
            TokenAlg::RsaPssSha256 | TokenAlg::RsaPssSha384 | TokenAlg::RsaPssSha512 => {
                MechanismType::RSA_PKCS_PSS
            }
            TokenAlg::RsaPkcs1Sha256 | TokenAlg::RsaPkcs1Sha384 | TokenAlg::RsaPkcs1Sha512 => {
                MechanismType::RSA_PKCS
            }
            TokenAlg::Ed25519 => MechanismType::EDDSA,
        }
    }
}

/// Schemes per key kind, most preferred first (rustls's own order for RSA).
fn schemes_for(kind: KeyKind) -> &'static [SignatureScheme] {
    match kind {
        KeyKind::EcP256 => &[SignatureScheme::ECDSA_NISTP256_SHA256],
        KeyKind::EcP384 => &[SignatureScheme::ECDSA_NISTP384_SHA384],
        KeyKind::Rsa { .. } => &[
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ],
        KeyKind::Ed25519 => &[SignatureScheme::ED25519],
    }
}

/// A private key on a token: everything needed to sign, nothing of the key itself.
#[derive(Debug)]
pub(crate) struct TokenKey {
    pub(crate) token: Arc<Token>,
    pub(crate) uri: Pkcs11Uri,
    pub(crate) kind: KeyKind,
    pub(crate) spki_der: Vec<u8>,
}

impl TokenKey {
    pub(crate) fn new(token: &Arc<Token>, uri: &Pkcs11Uri) -> Result<TokenKey> {
        let info = token.find(uri)?;
        // Pin the reference to the exact object found, so a key added later with the same
        // label cannot make the reference ambiguous mid-flight.
        let mut uri = uri.clone();
        if uri.id.is_none() && !info.id.is_empty() {
            uri.id = Some(info.id.clone());
        }
        Ok(TokenKey {
            token: Arc::clone(token),
            uri,
            kind: info.kind,
            spki_der: info.spki_der,
        })
    }

    pub(crate) fn sign(&self, alg: TokenAlg, message: &[u8]) -> Result<Vec<u8>> {
        let pss = |hash: MechanismType, mgf: PkcsMgfType, len: u64| {
            Mechanism::RsaPkcsPss(PkcsPssParams {
                hash_alg: hash,
                mgf,
                s_len: len.into(),
            })
        };
        let digest_info = |prefix: &[u8], d: digest::Digest| {
            let mut v = prefix.to_vec();
            v.extend_from_slice(d.as_ref());
            v
        };
        match alg {
            TokenAlg::EcdsaSha256 | TokenAlg::EcdsaSha384 => {
                let d = if alg == TokenAlg::EcdsaSha256 {
                    digest::digest(&digest::SHA256, message)
                } else {
                    digest::digest(&digest::SHA384, message)
                };
                let raw = self
                    .token
                    .sign_raw(&self.uri, &Mechanism::Ecdsa, d.as_ref())?;
                asn1::ecdsa_raw_to_der(&raw).ok_or_else(|| Error::Pkcs11 {
                    function: "C_Sign",
                    rv: format!("malformed ECDSA signature of {} bytes", raw.len()),
                })
            }
            TokenAlg::RsaPssSha256 => {
                let d = digest::digest(&digest::SHA256, message);
                let m = pss(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, 32);
                self.token.sign_raw(&self.uri, &m, d.as_ref())
            }
            TokenAlg::RsaPssSha384 => {
                let d = digest::digest(&digest::SHA384, message);
                let m = pss(MechanismType::SHA384, PkcsMgfType::MGF1_SHA384, 48);
                self.token.sign_raw(&self.uri, &m, d.as_ref())
            }
            TokenAlg::RsaPssSha512 => {
                let d = digest::digest(&digest::SHA512, message);
                let m = pss(MechanismType::SHA512, PkcsMgfType::MGF1_SHA512, 64);
                self.token.sign_raw(&self.uri, &m, d.as_ref())
            }
            TokenAlg::RsaPkcs1Sha256 => {
                let data =
                    digest_info(DIGEST_INFO_SHA256, digest::digest(&digest::SHA256, message));
                self.token.sign_raw(&self.uri, &Mechanism::RsaPkcs, &data)
            }
            TokenAlg::RsaPkcs1Sha384 => {
                let data =
                    digest_info(DIGEST_INFO_SHA384, digest::digest(&digest::SHA384, message));
                self.token.sign_raw(&self.uri, &Mechanism::RsaPkcs, &data)
            }
            TokenAlg::RsaPkcs1Sha512 => {
                let data =
                    digest_info(DIGEST_INFO_SHA512, digest::digest(&digest::SHA512, message));
                self.token.sign_raw(&self.uri, &Mechanism::RsaPkcs, &data)
            }
            TokenAlg::Ed25519 => {
                let m = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Ed25519));
                self.token.sign_raw(&self.uri, &m, message)
            }
        }
    }
}

/// A rustls `SigningKey` whose private half stays on the token — and on its replicas, when the
/// token has some ([`Token::add_replica`]): each signature goes to the one in service with the
/// fewest signatures in flight that has room in its in-flight budget (waiting for room when none
/// has), and a failed signature is tried once more on another in service with room.
#[derive(Debug, Clone)]
pub struct TokenSigningKey {
    /// The primary token's key first, then each replica's.
    keys: Arc<[Arc<TokenKey>]>,
    schemes: Vec<SignatureScheme>,
}

/// The same key on `replica`: found by the primary's label/id, with the same public key.
fn replica_key(primary: &TokenKey, replica: &Arc<Token>, uri: &Pkcs11Uri) -> Result<TokenKey> {
    let mismatch = |reason: String| Error::ReplicaMismatch {
        uri: uri.to_string(),
        replica: replica.label().to_owned(),
        reason,
    };
    let there = Pkcs11Uri {
        token: Some(replica.label().to_owned()),
        serial: None,
        ..uri.clone()
    };
    let key = TokenKey::new(replica, &there).map_err(|e| mismatch(e.to_string()))?;
    if key.spki_der != primary.spki_der {
        return Err(mismatch("it holds another public key".into()));
    }
    Ok(key)
}

impl TokenSigningKey {
    pub(crate) fn new(token: &Arc<Token>, uri: &Pkcs11Uri) -> Result<TokenSigningKey> {
        let key = TokenKey::new(token, uri)?;
        let mut keys = Vec::new();
        for replica in token.replicas() {
            keys.push(Arc::new(replica_key(&key, &replica, uri)?));
        }
        keys.insert(0, Arc::new(key));
        let kind = keys[0].kind;
        // Offer only what every token can do, so a handshake never picks a scheme that fails.
        let schemes: Vec<SignatureScheme> = schemes_for(kind)
            .iter()
            .copied()
            .filter(|s| {
                TokenAlg::from_scheme(*s).is_some_and(|a| {
                    keys.iter()
                        .all(|k| k.token.has_mechanism(a.mechanism_type()))
                })
            })
            .collect();
        if schemes.is_empty() {
            return Err(Error::MechanismUnavailable {
                token: token.label().to_owned(),
                mechanism: format!("any signature mechanism for a {kind} key"),
            });
        }
        Ok(TokenSigningKey {
            keys: keys.into(),
            schemes,
        })
    }

    fn primary(&self) -> &TokenKey {
        &self.keys[0]
    }

    /// The schemes this key can produce, most preferred first.
    pub fn schemes(&self) -> &[SignatureScheme] {
        &self.schemes
    }

    pub fn kind(&self) -> KeyKind {
        self.primary().kind
    }

    pub fn uri(&self) -> &Pkcs11Uri {
        &self.primary().uri
    }

    /// The labels of the tokens this key signs on, primary first.
    pub fn tokens(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.token.label().to_owned())
            .collect()
    }
}

impl SigningKey for TokenSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.schemes.iter().copied().find(|s| offered.contains(s))?;
        let alg = TokenAlg::from_scheme(scheme)?;
        Some(Box::new(TokenSigner {
            keys: Arc::clone(&self.keys),
            scheme,
            alg,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(
            self.primary().spki_der.as_slice(),
        ))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.primary().kind {
            KeyKind::EcP256 | KeyKind::EcP384 => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa { .. } => SignatureAlgorithm::RSA,
            KeyKind::Ed25519 => SignatureAlgorithm::ED25519,
        }
    }
}

#[derive(Debug)]
struct TokenSigner {
    keys: Arc<[Arc<TokenKey>]>,
    scheme: SignatureScheme,
    alg: TokenAlg,
}

/// Signatures waiting for room on a token wait here; a freed place wakes them. Process-wide by
/// nature: it holds no state (a waiter looks at its own token again).
static ROOM: (parking_lot::Mutex<()>, parking_lot::Condvar) =
    (parking_lot::Mutex::new(()), parking_lot::Condvar::new());

/// Longest sleep between two looks for room (a token that comes back into service does not
/// free a place, so waiters also look again on their own).
const ROOM_RECHECK: Duration = Duration::from_millis(20);

/// A place in a token's budget was freed: wake the signatures waiting for one.
pub(super) fn room_freed() {
    ROOM.1.notify_all();
}

impl TokenSigner {
    /// The token to sign on and its place in the budget: in service first, then the fewest
    /// signatures in flight (the primary wins ties), among those with room. When every token in
    /// service is at its budget the signature waits for room up to the primary's budget wait,
    /// then is shed (`Err(None)`); with no token in service `Err(Some(key))` names the one to
    /// try, which answers `TokenUnavailable` at once.
    fn reserve(
        &self,
        skip: Option<&Arc<Token>>,
        wait: bool,
    ) -> std::result::Result<(&Arc<TokenKey>, super::SignPermit), Option<&Arc<TokenKey>>> {
        let give_up = Instant::now() + self.keys[0].token.budget_wait();
        loop {
            let mut order: Vec<&Arc<TokenKey>> = self
                .keys
                .iter()
                .filter(|k| skip.is_none_or(|t| !Arc::ptr_eq(t, &k.token)))
                .collect();
            order.sort_by_key(|k| (!k.token.is_up(), k.token.signing()));
            let Some(first) = order.first().copied() else {
                return Err(None);
            };
            if !first.token.is_up() {
                return Err(Some(first));
            }
            for key in order.iter().filter(|k| k.token.is_up()) {
                if let Some(permit) = key.token.try_reserve() {
                    return Ok((key, permit));
                }
            }
            let now = Instant::now();
            if !wait || now >= give_up {
                return Err(None);
            }
            let mut guard = ROOM.0.lock();
            // A place freed between the look above and this wait is seen at the next look,
            // at most `ROOM_RECHECK` later.
            ROOM.1
                .wait_for(&mut guard, (give_up - now).min(ROOM_RECHECK));
            drop(guard);
        }
    }

    fn note_failure(&self, key: &TokenKey, e: &Error) {
        // One line per interval with the count: an HSM that is down fails every full
        // handshake, and each must not write its own line.
        if let Some(failed) = key.token.sign_failure_line() {
            tracing::warn!(
                key = %key.uri, scheme = ?self.scheme, error = %e, failed,
                interval_secs = super::health::SIGN_LOG_INTERVAL.as_secs(),
                "token signatures failed (one line per interval; count since the last line)"
            );
        }
    }
}

impl Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        // `Other` tells the data plane that the key failed, not the peer's handshake.
        let fail = |e: Error| Err(rustls::Error::Other(rustls::OtherError(Arc::new(e))));
        let (key, permit) = match self.reserve(None, true) {
            Ok(chosen) => chosen,
            Err(Some(down)) => {
                // No token in service: this answers TokenUnavailable at once (and counts it).
                let e = match down.sign(self.alg, message) {
                    Ok(signature) => return Ok(signature),
                    Err(e) => e,
                };
                self.note_failure(down, &e);
                return fail(e);
            }
            Err(None) => {
                let primary = &self.keys[0].token;
                primary.count_shed();
                return fail(Error::BudgetFull {
                    tokens: self
                        .keys
                        .iter()
                        .map(|k| k.token.label().to_owned())
                        .collect(),
                    waited_ms: primary.budget_wait().as_millis() as u64,
                });
            }
        };
        let first = match key.sign(self.alg, message) {
            Ok(signature) => return Ok(signature),
            Err(e) => e,
        };
        drop(permit);
        self.note_failure(key, &first);
        // One more try on another token in service with room now (no wait: the deadline is
        // already partly spent).
        if let Ok((other, _permit)) = self.reserve(Some(&key.token), false) {
            match other.sign(self.alg, message) {
                Ok(signature) => return Ok(signature),
                Err(e) => self.note_failure(other, &e),
            }
        }
        fail(first)
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// The stand-in for a token key while its token has not been opened yet (`tlsgate serve` started
/// degraded): it offers the schemes of the certificate's key and refuses every signature at once
/// with [`Error::TokenUnavailable`], counting it in `refused`. It reports no public key, so
/// nothing is checked against the certificate until the real key replaces it.
#[derive(Debug)]
pub struct UnavailableTokenKey {
    token: String,
    kind: KeyKind,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl UnavailableTokenKey {
    /// `spki_der`: the certificate's public key (gives the algorithm); `token`: the label.
    pub fn new(
        token: &str,
        spki_der: &[u8],
        refused: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<UnavailableTokenKey> {
        Ok(UnavailableTokenKey {
            token: token.to_owned(),
            kind: KeyKind::from_spki(spki_der)?,
            refused,
        })
    }
}

impl SigningKey for UnavailableTokenKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = schemes_for(self.kind)
            .iter()
            .copied()
            .find(|s| offered.contains(s))?;
        Some(Box::new(UnavailableSigner {
            token: self.token.clone(),
            scheme,
            refused: Arc::clone(&self.refused),
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        None
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.kind {
            KeyKind::EcP256 | KeyKind::EcP384 => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa { .. } => SignatureAlgorithm::RSA,
            KeyKind::Ed25519 => SignatureAlgorithm::ED25519,
        }
    }
}

#[derive(Debug)]
struct UnavailableSigner {
    token: String,
    scheme: SignatureScheme,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl Signer for UnavailableSigner {
    fn sign(&self, _message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let e = Error::TokenUnavailable {
            token: self.token.clone(),
            rv: "not opened yet (started degraded)".to_owned(),
            since_ms: 0,
        };
        Err(rustls::Error::Other(rustls::OtherError(Arc::new(e))))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}
