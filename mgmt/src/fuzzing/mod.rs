//! Fuzz entry points for the management plane's parsers of untrusted bytes: the configuration
//! file, certificate and CRL uploads, the API's JSON bodies, session tickets and OCSP
//! responses. The `fuzz/` crate's targets call these; `replay` tests run their corpora on
//! stable.
//!
//! Compiled only for tests and under `--cfg fuzzing` (which `cargo fuzz` sets): the fixture
//! keys are throwaway test keys and never part of a product build. Every function takes
//! arbitrary bytes, must not panic, and asserts an invariant a bug would break. Time is fixed
//! ([`NOW_UNIX`]) so a failing input fails the same way every time.

mod ocsp;
#[cfg(test)]
mod replay;
mod tickets;

pub use ocsp::ocsp_response;
pub use tickets::ticket_decrypt;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tlsgate_keystore::cert::{fmt_time, CertChain};
use tlsgate_keystore::keyref::KeyRef;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::api::manager::{crl_der, crl_view, pem_encode_crl, CsrRequest, GenerateKey};
use crate::api::manager::{PutBinding, PutCert, PutCrl};
use crate::config::Config;
use crate::state::StoredCrl;

/// The fuzzing clock, Unix seconds: 2027-01-15, inside the fixtures' validity (100 years from
/// 2026-12).
pub const NOW_UNIX: u64 = 1_800_000_000;

/// [`NOW_UNIX`] as a time.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_UNIX)
}

fn fixture_chain() -> Vec<CertificateDer<'static>> {
    // Checked in and made by fuzz/make-seeds.sh: parsing them cannot fail.
    let leaf =
        CertificateDer::from_pem_slice(include_bytes!("fixtures/leaf.pem")).expect("fixture leaf");
    let ca = CertificateDer::from_pem_slice(include_bytes!("fixtures/ca.pem")).expect("fixture CA");
    vec![leaf, ca]
}

/// The configuration file (`Config::parse`: TOML, then every cross-field check). What it
/// accepts must be usable: listeners named uniquely and validly, keys and the PIN source
/// readable, and the data-plane settings derivable.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/tlsgate/tlsgate.toml");
    match Config::parse(text, path) {
        Ok(config) => {
            assert!(!config.listeners.is_empty(), "a config has a listener");
            let mut names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(
                names.len(),
                config.listeners.len(),
                "listener names are unique"
            );
            for l in &config.listeners {
                assert!(l.tls_policy().is_ok(), "an accepted listener has a policy");
                assert!(l.session.check().is_ok());
                for c in &l.certificates {
                    assert!(
                        c.key.parse::<KeyRef>().is_ok(),
                        "an accepted key reference parses"
                    );
                    let _ = config.resolve(&c.chain);
                }
            }
            assert!(config.pin_source().is_ok());
            assert!(!config.dataplane().cores.is_empty());
            let _ = crate::api::state_dir(&config);
        }
        Err(e) => assert!(!e.to_string().is_empty(), "an error says what is wrong"),
    }
}

/// Certificate chains (the API's `chain_pem`, the configuration's chain files) and CRLs (API
/// uploads and the configuration's CRL files). Mode byte 0: a chain: what parses re-parses
/// from its normalised form to the same certificates, and validates (against the leaf's own
/// key) without panicking, with a report inside the validity it checked. 1: a CRL upload: the
/// stored form parses back to the same DER and has a listing. 2: a CRL file.
pub fn pem_upload(data: &[u8]) {
    let Some((mode, body)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => chain(body),
        1 => {
            if let Ok(text) = std::str::from_utf8(body) {
                crl_upload(text);
            }
        }
        _ => {
            if let Ok(crls) = crate::tls::client_auth::parse_crls(body) {
                assert!(!crls.is_empty());
                for crl in &crls {
                    let _ = crate::tls::client_auth::crl_next_update(crl);
                }
            }
        }
    }
}

fn chain(body: &[u8]) {
    let Ok(chain) = CertChain::from_pem(body) else {
        return;
    };
    assert!(!chain.certs.is_empty(), "a parsed chain has a certificate");
    let again = CertChain::from_pem(chain.to_pem().as_bytes()).expect("the stored form re-parses");
    assert_eq!(again, chain, "normalising keeps every certificate");
    let spki = X509Certificate::from_der(&chain.certs[0])
        .map(|(_, c)| c.public_key().raw.to_vec())
        .expect("from_pem checked that every certificate parses");
    let fixture_leaf = fixture_chain().remove(0);
    let other = X509Certificate::from_der(&fixture_leaf)
        .map(|(_, c)| c.public_key().raw.to_vec())
        .expect("fixture leaf");
    let now = now();
    let _ = chain.validate(&other, now);
    if let Ok(r) = chain.validate(&spki, now) {
        assert!(
            r.not_before <= now && now <= r.not_after,
            "validated at NOW"
        );
        assert!(r.chain_not_after <= r.not_after);
        assert_eq!(r.fingerprint_sha256.len(), 64);
        for t in [r.not_before, r.not_after, r.chain_not_after] {
            assert!(!fmt_time(t).is_empty());
        }
    }
}

fn crl_upload(text: &str) {
    let Ok(der) = crl_der(text) else {
        return;
    };
    let stored = pem_encode_crl(der.as_ref());
    let back = crl_der(&stored).expect("the stored CRL re-parses");
    assert_eq!(
        back.as_ref(),
        der.as_ref(),
        "the stored CRL is the uploaded one"
    );
    let view = crl_view(&StoredCrl {
        id: "fuzz".into(),
        pem: stored,
    })
    .expect("a CRL that parsed has a listing");
    assert!(!view.this_update.is_empty());
}

/// The API's request bodies, parsed as the routes parse them (`serde_json`, unknown fields
/// refused), then the checks the manager makes before it touches the token. Mode byte: 0
/// generate key, 1 import key, 2 CSR, 3 certificate upload, 4 binding, 5 CRL upload, 6 a path
/// parameter (object name).
pub fn api_json_bodies(data: &[u8]) {
    let Some((mode, body)) = data.split_first() else {
        return;
    };
    match mode % 7 {
        0 => {
            if let Ok(r) = crate::api::routes::body::<GenerateKey>(body) {
                let _ = r.kind.parse::<tlsgate_keystore::KeySpec>();
                let _ = crate::api::manager::check_label(&r.label);
                let _ = crate::api::manager::parse_id(r.id.as_deref());
            }
        }
        1 => {
            // The import body as the route reads it: into secret memory, parsed there.
            let Ok(raw) = tlsgate_keystore::secret::SecretBuf::from_slice(body) else {
                return;
            };
            if let Ok(r) = crate::api::secret_body::parse_import(&raw) {
                if let Some(der) =
                    tlsgate_keystore::secret::pkcs8_der_from_pem(r.pkcs8_pem.as_bytes())
                {
                    let _ = tlsgate_keystore::software::from_pkcs8_der(der.as_bytes());
                }
                let _ = crate::api::manager::check_label(&r.label);
                let _ = crate::api::manager::parse_id(r.id.as_deref());
            }
        }
        2 => {
            if let Ok(r) = crate::api::routes::body::<CsrRequest>(body) {
                csr(&r);
            }
        }
        3 => {
            if let Ok(r) = crate::api::routes::body::<PutCert>(body) {
                if r.key.contains(':') {
                    let _ = r.key.parse::<KeyRef>();
                }
                chain(r.chain_pem.as_bytes());
            }
        }
        4 => {
            if let Ok(r) = crate::api::routes::body::<PutBinding>(body) {
                for c in r.certificates {
                    let _ = crate::state::check_name("certificate", &c.cert);
                    for n in c.names.iter().flatten() {
                        if let Ok(n) = crate::tls::normalize_name(n) {
                            assert_eq!(crate::tls::normalize_name(&n).ok(), Some(n.clone()));
                        }
                    }
                }
            }
        }
        5 => {
            if let Ok(r) = crate::api::routes::body::<PutCrl>(body) {
                crl_upload(&r.pem);
            }
        }
        _ => {
            if let Ok(name) = std::str::from_utf8(body) {
                if crate::state::check_name("certificate", name).is_ok() {
                    assert!(
                        !name.contains('/') && !name.starts_with('.'),
                        "a safe file name"
                    );
                }
            }
        }
    }
}

/// The CSR the API would sign (`keystore::csr::create_csr`), here with a software key: what
/// it makes parses as a PKCS#10 request naming the requested common name.
fn csr(r: &CsrRequest) {
    use std::sync::OnceLock;
    static KEY: OnceLock<rcgen::KeyPair> = OnceLock::new();
    if r.common_name.is_empty() {
        return;
    }
    let key = KEY.get_or_init(|| rcgen::KeyPair::generate().expect("aws-lc-rs makes a P-256 key"));
    let Ok(pem) = tlsgate_keystore::csr::create_csr(key, &r.common_name, &r.sans) else {
        return;
    };
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("the CSR is one PEM block");
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .expect("the CSR parses");
    let cn = req
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok());
    assert_eq!(
        cn,
        Some(r.common_name.as_str()),
        "the CSR names the common name asked for"
    );
}
