//! Keys and certificates for tlsgate.
//!
//! In HSM mode no private key byte ever enters this process: keys are named by PKCS#11 URIs,
//! generated or imported into the token as sensitive and non-extractable, and every signature
//! is a PKCS#11 call. Software keys (`file:` PKCS#8 PEM) are a second, explicit backend behind
//! the same rustls `SigningKey` interface.
#![forbid(unsafe_code)]

mod asn1;
pub mod cert;
pub mod credential;
pub mod csr;
pub mod error;
pub mod keyinfo;
pub mod keyref;
pub mod labca;
pub mod pin;
pub mod secret;
pub mod software;
pub mod token;
pub mod uri;

pub use cert::{certified_key, CertChain, CertError, ChainReport};
pub use credential::{ChainSource, Credential};
pub use error::{Error, Result};
pub use keyinfo::{spki_pem, KeyInfo, KeyKind, KeyOrigin, KeySpec};
pub use keyref::{KeyBackend, KeyRef, LoadedKey};
pub use pin::PinSource;
pub use token::{Token, TokenRcgenKey, TokenSelector, TokenSigningKey};
pub use uri::{ObjectType, Pkcs11Uri, UriError};
