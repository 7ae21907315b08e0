//! Handshake signatures: in process (aws-lc-rs, what a `file:` key does) against a SoftHSM2
//! token (what a `pkcs11:` key does: the keystore's session pool, C_SignInit + C_Sign), for
//! ECDSA P-256 and RSA-2048 (PSS), through the same rustls `SigningKey` the data plane calls.
//!
//!     cargo bench -p tlsgate-benches --bench signing
//!
//! The token is made for the run in a temporary directory with `softhsm2-util`; without
//! SoftHSM2 the token rows are skipped with the reason printed.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::sign::{Signer, SigningKey};
use rustls::SignatureScheme;
use tlsgate_keystore::{KeySpec, PinSource, Token, TokenSelector};

const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN_VAR: &str = "TLSGATE_BENCH_TOKEN_PIN";
/// What a TLS 1.3 CertificateVerify signs: 64 spaces, the context string, a SHA-256 transcript
/// hash (130 bytes).
const MESSAGE: [u8; 130] = [0x20; 130];

/// A named key and the scheme it signs with.
type Keys = Vec<(&'static str, Arc<dyn SigningKey>, SignatureScheme)>;

fn signer(key: &dyn SigningKey, scheme: SignatureScheme) -> Box<dyn Signer> {
    key.choose_scheme(&[scheme])
        .unwrap_or_else(|| panic!("the key offers no {scheme:?}"))
}

fn software_keys() -> Keys {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let ec = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
        .expect("generate P-256");
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .expect("generate RSA-2048");
    let rsa_der = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'_>>::as_der(&rsa)
        .expect("RSA PKCS#8");
    let load = |der: &[u8]| {
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(der.to_vec()),
        ))
        .expect("load key")
    };
    vec![
        (
            "ecdsa-p256",
            load(ec.as_ref()),
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ),
        (
            "rsa-2048-pss",
            load(rsa_der.as_ref()),
            SignatureScheme::RSA_PSS_SHA256,
        ),
    ]
}

/// A fresh SoftHSM2 token with one P-256 and one RSA-2048 key; `Err` says why there is none.
fn token_keys(dir: &Path) -> Result<Keys, String> {
    if !Path::new(SOFTHSM2_MODULE).is_file() {
        return Err(format!("SoftHSM2 module {SOFTHSM2_MODULE} not found"));
    }
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    // SoftHSM2 reads this once, when the module initialises (below, in Token::open).
    std::env::set_var("SOFTHSM2_CONF", &conf);
    std::env::set_var(PIN_VAR, "bench-pin-1234");
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "bench"])
        .args(["--pin", "bench-pin-1234", "--so-pin", "bench-so-5678"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .map_err(|e| format!("softhsm2-util: {e}"))?;
    if !init.status.success() {
        return Err(format!(
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&init.stderr)
        ));
    }
    let pin: PinSource = format!("env:{PIN_VAR}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let token = Token::open(
        Path::new(SOFTHSM2_MODULE),
        TokenSelector::Label("bench".to_owned()),
        &pin,
    )
    .map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for (name, spec, scheme) in [
        (
            "ecdsa-p256",
            KeySpec::EcP256,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ),
        (
            "rsa-2048-pss",
            KeySpec::Rsa2048,
            SignatureScheme::RSA_PSS_SHA256,
        ),
    ] {
        let info = token
            .generate(spec, name, None)
            .map_err(|e| e.to_string())?;
        let key = token
            .signing_key(&info.uri(token.label()))
            .map_err(|e| e.to_string())?;
        keys.push((name, key, scheme));
    }
    Ok(keys)
}

fn signing(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake_signature");
    for (name, key, scheme) in software_keys() {
        let s = signer(key.as_ref(), scheme);
        group.bench_function(format!("in_process/{name}"), |b| {
            b.iter(|| s.sign(&MESSAGE).expect("sign"))
        });
    }
    let dir = tempfile::tempdir().expect("temp dir");
    match token_keys(dir.path()) {
        Ok(keys) => {
            for (name, key, scheme) in keys {
                let s = signer(key.as_ref(), scheme);
                group.bench_function(format!("softhsm2/{name}"), |b| {
                    b.iter(|| s.sign(&MESSAGE).expect("sign on the token"))
                });
            }
        }
        Err(why) => eprintln!("SKIP softhsm2 rows: {why}"),
    }
    group.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
