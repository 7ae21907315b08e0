//! The keystore's error type.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::uri::UriError;

/// Result alias used throughout the keystore.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the keystore can fail with. Variants carry structured fields so callers (the CLI,
/// the management API, tests) can act on the cause instead of parsing messages. No variant ever
/// carries PIN or private key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PKCS#11 call failed. `function` is the Cryptoki function (`C_Sign`), `rv` the CKR name.
    #[error("PKCS#11 {function} failed: {rv}")]
    Pkcs11 { function: &'static str, rv: String },

    /// The token is out of service after a device-level error (`rv`, `since_ms` ago) and is
    /// being recovered in the background; nothing was sent to it.
    #[error(
        "token {token:?} is out of service since {since_ms} ms ago ({rv}); recovery is under way"
    )]
    TokenUnavailable {
        token: String,
        rv: String,
        since_ms: u64,
    },

    /// Every token in service was at its in-flight budget (`max_inflight`) for as long as a
    /// signature may wait: the signature was shed without reaching a token.
    #[error("every token in service ({}) is at its in-flight budget; shed after waiting {waited_ms} ms", tokens.join(", "))]
    BudgetFull { tokens: Vec<String>, waited_ms: u64 },

    /// A replica token does not hold the key the primary holds, or holds another public key.
    #[error("replica token {replica:?} does not hold the same key as {uri}: {reason}")]
    ReplicaMismatch {
        uri: String,
        replica: String,
        reason: String,
    },

    /// A PKCS#11 call did not answer within its deadline (a frozen or unreachable HSM).
    #[error("{what}: the HSM did not answer within {after_ms} ms")]
    Timeout { what: String, after_ms: u64 },

    /// The token refused the user PIN.
    #[error("token {token:?} rejected the user PIN (CKR_PIN_INCORRECT)")]
    PinIncorrect { token: String },

    /// The token locked the user PIN after too many failures.
    #[error("the user PIN of token {token:?} is locked (CKR_PIN_LOCKED)")]
    PinLocked { token: String },

    /// The PIN could not be obtained from its source (`env:VAR` or `file:PATH`).
    #[error("cannot read the PIN from {source_desc}: {reason}")]
    PinSource { source_desc: String, reason: String },

    /// A PIN file that group or others may access: refused, since anyone on the box could read it.
    #[error(
        "PIN file {} has mode {mode:04o}: group/others may access it; \
         make it readable by its owner only (chmod 600)",
        path.display()
    )]
    PinFilePermissions { path: PathBuf, mode: u32 },

    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load PKCS#11 module {}: {reason}", path.display())]
    ModuleLoad { path: PathBuf, reason: String },

    /// No token with that label (or serial) in any slot of the module.
    #[error("no token {label:?} in PKCS#11 module {}", module.display())]
    TokenNotFound { label: String, module: PathBuf },

    /// The URI names a token other than the one it was looked up in.
    #[error("key {uri} names token {wanted:?}, but it was looked up in token {token:?}")]
    WrongToken {
        uri: String,
        wanted: String,
        token: String,
    },

    /// A token with that label is already initialised.
    #[error("a token labelled {label:?} already exists")]
    TokenExists { label: String },

    /// No private key matches the URI.
    #[error("no private key matches {uri}")]
    KeyNotFound { uri: String },

    /// More than one private key matches the URI; a key reference must name exactly one.
    #[error("{count} private keys match {uri}; add id= or a more precise object=")]
    AmbiguousKey { uri: String, count: usize },

    /// A key with that label or id already exists on the token.
    #[error("token {token:?} already holds a key labelled {label:?}")]
    KeyExists { token: String, label: String },

    /// A key with that CKA_ID already exists on the token.
    #[error("token {token:?} already holds a key with id {id_hex}")]
    KeyIdExists { token: String, id_hex: String },

    /// A malformed PKCS#11 URI or key reference.
    #[error(transparent)]
    Uri(#[from] UriError),

    /// The key type, curve or size is not one the keystore handles.
    #[error("unsupported key: {reason}")]
    UnsupportedKey { reason: String },

    /// The token offers no mechanism the keystore needs for this key.
    #[error("token {token:?} does not offer {mechanism}")]
    MechanismUnavailable { token: String, mechanism: String },

    /// Private key input (PKCS#8 PEM/DER) that does not parse. Never contains key bytes.
    #[error("cannot parse private key{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    KeyParse {
        path: Option<PathBuf>,
        reason: String,
    },

    /// A certificate or chain problem.
    #[error(transparent)]
    Certificate(#[from] CertError),

    /// Building a CSR or certificate failed.
    #[error("certificate generation failed: {reason}")]
    CertGeneration { reason: String },

    /// The lab CA directory is missing something or is malformed.
    #[error("lab CA in {}: {reason}", dir.display())]
    LabCa { dir: PathBuf, reason: String },

    /// File I/O.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// What is wrong with a certificate or chain. `index` 0 is the leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("certificate PEM: {reason}")]
    Pem { reason: String },
    #[error("no certificate in the PEM input")]
    Empty,
    #[error("certificate #{index} does not parse: {reason}")]
    Parse { index: usize, reason: String },
    #[error("the leaf certificate ({subject}) is for a different key than the one given")]
    KeyMismatch { subject: String },
    #[error(
        "chain out of order at certificate #{index} ({subject}): it is issued by \
         {expected_issuer}, but the next certificate is {next_subject}"
    )]
    ChainOrder {
        index: usize,
        subject: String,
        expected_issuer: String,
        next_subject: String,
    },
    #[error("certificate #{index} ({subject}) expired at {}", fmt_time(*not_after))]
    Expired {
        index: usize,
        subject: String,
        not_after: SystemTime,
    },
    #[error("certificate #{index} ({subject}) is not valid before {}", fmt_time(*not_before))]
    NotYetValid {
        index: usize,
        subject: String,
        not_before: SystemTime,
    },
    #[error("the signature on certificate #{index} ({subject}) does not verify with the next certificate's key")]
    BadSignature { index: usize, subject: String },
    #[error("certificate #{index} ({subject}) is signed with unsupported algorithm {algorithm}")]
    UnsupportedSignature {
        index: usize,
        subject: String,
        algorithm: String,
    },
}

/// RFC 3339 in UTC, for messages.
pub fn fmt_time(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {secs}"))
}
