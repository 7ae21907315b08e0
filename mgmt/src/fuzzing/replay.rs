//! The management plane's fuzz targets on stable, inside the test suite: every corpus and
//! regression file under `fuzz/`, then inputs mutated from them by a seeded generator. The
//! harness is the data plane's (one copy; it is test code, so it is included, not imported).

#[path = "../../../dataplane/src/fuzzing/harness.rs"]
mod harness;

use harness::replay;

#[test]
fn config_toml_corpus_and_generated_inputs() {
    assert!(replay("config_toml", 5000, super::config_toml) >= 5000);
}

#[test]
fn pem_upload_corpus_and_generated_inputs() {
    assert!(replay("pem_upload", 5000, super::pem_upload) >= 5000);
}

#[test]
fn api_json_bodies_corpus_and_generated_inputs() {
    assert!(replay("api_json_bodies", 5000, super::api_json_bodies) >= 5000);
}

#[test]
fn ticket_decrypt_corpus_and_generated_inputs() {
    assert!(replay("ticket_decrypt", 5000, super::ticket_decrypt) >= 5000);
}

#[test]
fn ocsp_response_corpus_and_generated_inputs() {
    assert!(replay("ocsp_response", 5000, super::ocsp_response) >= 5000);
}

/// The seeds are only worth fuzzing from if they reach the deep checks: the OCSP responses
/// made by `openssl ocsp` for the fixture chain pass (or fail) for the reason they were made
/// for, also after re-signing, and the fixture chain validates.
#[test]
fn seeds_reach_the_checks_they_were_made_for() {
    use crate::ocsp::{check, OcspError};
    let corpus = |target: &str, name: &str| {
        harness::files(target)
            .into_iter()
            .find(|(p, _)| p.ends_with(name))
            .unwrap_or_else(|| panic!("fuzz/corpus/{target}/{name} is missing"))
            .1
    };
    let chain = super::fixture_chain();
    let now = super::now();
    for (name, want) in [
        ("good", Ok(())),
        ("good-resigned", Ok(())),
        ("good256", Ok(())),
        ("delegated", Ok(())),
        ("revoked", Err(OcspError::Revoked)),
        ("revoked-resigned", Err(OcspError::Revoked)),
        ("unknown", Err(OcspError::Unknown)),
        ("nonext", Err(OcspError::Stale)),
    ] {
        let seed = corpus("ocsp_response", name);
        let response = if seed[0] & 1 == 1 {
            super::ocsp::resign(&seed[1..]).expect("the seed parses")
        } else {
            seed[1..].to_vec()
        };
        assert_eq!(check(&response, &chain, now).map(|_| ()), want, "{name}");
    }
    let pem = corpus("pem_upload", "chain");
    let parsed = tlsgate_keystore::cert::CertChain::from_pem(&pem[1..]).expect("chain seed");
    assert_eq!(parsed.certs, chain);
}
