//! Key backends, so one test body runs against each: in-process software keys, a fresh
//! SoftHSM2 token, and any other PKCS#11 module named by `TLSGATE_TEST_PKCS11_MODULE` (with
//! `TLSGATE_TEST_PKCS11_TOKEN` and `TLSGATE_TEST_PKCS11_PIN`, the PIN itself).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use rustls::sign::SigningKey;
use tlsgate_keystore::{
    software, KeyInfo, KeyKind, KeySpec, PinSource, Pkcs11Uri, Token, TokenSelector,
};

use crate::softhsm::TestToken;

pub const ENV_MODULE: &str = "TLSGATE_TEST_PKCS11_MODULE";
pub const ENV_TOKEN: &str = "TLSGATE_TEST_PKCS11_TOKEN";
pub const ENV_PIN: &str = "TLSGATE_TEST_PKCS11_PIN";

/// Where test keys live.
pub enum Backend {
    Software,
    SoftHsm {
        token: TestToken,
        opened: Arc<Token>,
    },
    External {
        module: PathBuf,
        label: String,
        opened: Arc<Token>,
    },
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Every backend available here. Unavailable ones are reported on stderr with the reason,
/// so a skipped backend is visible in the test output.
pub fn backends() -> Result<Vec<Backend>> {
    let mut out = vec![Backend::Software];
    match crate::softhsm::unavailable() {
        None => {
            let token = TestToken::new()?;
            let opened = token.open()?;
            out.push(Backend::SoftHsm { token, opened });
        }
        Some(why) => crate::skip::missing(format!("SoftHSM2 backend: {why}")),
    }
    match std::env::var_os(ENV_MODULE) {
        // An optional extra backend, not a missing component: nothing to count.
        None => {}
        Some(module) => {
            let module = PathBuf::from(module);
            let label = std::env::var(ENV_TOKEN)
                .with_context(|| format!("{ENV_MODULE} is set but {ENV_TOKEN} is not"))?;
            std::env::var_os(ENV_PIN)
                .with_context(|| format!("{ENV_MODULE} is set but {ENV_PIN} is not"))?;
            let opened = Token::open(
                &module,
                TokenSelector::Label(label.clone()),
                &PinSource::Env(ENV_PIN.into()),
            )?;
            out.push(Backend::External {
                module,
                label,
                opened,
            });
        }
    }
    Ok(out)
}

/// A key created for a test. Token keys are deleted from the token when it drops.
pub struct TestKey {
    pub signing_key: Arc<dyn SigningKey>,
    pub spki_der: Vec<u8>,
    pub kind: KeyKind,
    /// For token keys: the token, the key's URI and what the token reports about it.
    pub token: Option<(Arc<Token>, Pkcs11Uri, KeyInfo)>,
    /// For software keys: the PKCS#8 DER (tests need it to build rcgen keys).
    pub pkcs8: Option<Vec<u8>>,
}

impl fmt::Debug for TestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Drop for TestKey {
    fn drop(&mut self) {
        if let Some((token, uri, _)) = &self.token {
            if let Err(e) = token.delete(uri) {
                eprintln!("warning: could not delete test key {uri}: {e}");
            }
        }
    }
}

impl TestKey {
    /// A CSR signed by this key (through the token for token keys).
    pub fn csr(&self, cn: &str, sans: &[String]) -> Result<String> {
        match (&self.token, &self.pkcs8) {
            (Some((token, uri, _)), _) => Ok(tlsgate_keystore::csr::create_csr(
                &token.rcgen_key(uri)?,
                cn,
                sans,
            )?),
            (None, Some(der)) => {
                let key = rcgen::KeyPair::try_from(der.as_slice())
                    .context("loading the software key into rcgen")?;
                Ok(tlsgate_keystore::csr::create_csr(&key, cn, sans)?)
            }
            (None, None) => anyhow::bail!("test key without a backend"),
        }
    }
}

/// PKCS#8 DER of a fresh software key.
pub fn software_pkcs8(spec: KeySpec) -> Result<Vec<u8>> {
    use aws_lc_rs::signature::{self as sig, EcdsaKeyPair, Ed25519KeyPair};
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let fail = |_| anyhow::anyhow!("aws-lc-rs could not generate a {spec} key");
    Ok(match spec {
        KeySpec::EcP256 => EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(fail)?
            .as_ref()
            .to_vec(),
        KeySpec::EcP384 => EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P384_SHA384_ASN1_SIGNING, &rng)
            .map_err(fail)?
            .as_ref()
            .to_vec(),
        KeySpec::Ed25519 => Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(fail)?
            .as_ref()
            .to_vec(),
        KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096 => {
            let size = match spec {
                KeySpec::Rsa2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
                KeySpec::Rsa3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
                _ => aws_lc_rs::rsa::KeySize::Rsa4096,
            };
            let kp = aws_lc_rs::rsa::KeyPair::generate(size).map_err(fail)?;
            AsDer::<Pkcs8V1Der<'_>>::as_der(&kp)
                .map_err(fail)?
                .as_ref()
                .to_vec()
        }
    })
}

impl Backend {
    pub fn name(&self) -> String {
        match self {
            Backend::Software => "software".into(),
            Backend::SoftHsm { token, .. } => format!("softhsm2 (token {})", token.label()),
            Backend::External { module, label, .. } => {
                format!("pkcs11 {} (token {label})", module.display())
            }
        }
    }

    /// The opened token, for token backends.
    pub fn token(&self) -> Option<&Arc<Token>> {
        match self {
            Backend::Software => None,
            Backend::SoftHsm { opened, .. } | Backend::External { opened, .. } => Some(opened),
        }
    }

    /// Creates a key of `spec` labelled `label` (made unique per process for token backends
    /// that outlive the test, i.e. external modules). `Ok(None)` with a printed reason when the
    /// backend cannot make that kind of key.
    pub fn generate(&self, spec: KeySpec, label: &str) -> Result<Option<TestKey>> {
        match self.token() {
            None => {
                let der = software_pkcs8(spec)?;
                let sw = software::from_pkcs8_der(&der)?;
                Ok(Some(TestKey {
                    signing_key: sw.signing_key,
                    spki_der: sw.spki_der,
                    kind: sw.kind,
                    token: None,
                    pkcs8: Some(der),
                }))
            }
            Some(token) => {
                let label = format!("{label}-{}", std::process::id());
                let info = match token.generate(spec, &label, None) {
                    Ok(info) => info,
                    Err(tlsgate_keystore::Error::MechanismUnavailable { mechanism, .. }) => {
                        crate::skip::missing(format!(
                            "{spec} on {}: token lacks {mechanism}",
                            self.name()
                        ));
                        return Ok(None);
                    }
                    Err(e) => return Err(e).with_context(|| format!("generating {spec}")),
                };
                let uri = info.uri(token.label());
                let signing_key = token.signing_key(&uri)?;
                Ok(Some(TestKey {
                    signing_key,
                    spki_der: info.spki_der.clone(),
                    kind: info.kind,
                    token: Some((Arc::clone(token), uri, info)),
                    pkcs8: None,
                }))
            }
        }
    }
}
