//! OCSP responses (`ocsp::check`) for the fixture leaf and its CA.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use der::asn1::{BitString, OctetString};
use der::{Decode, Encode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use x509_ocsp::{BasicOcspResponse, OcspResponse};

use super::{fixture_chain, now};
use crate::ocsp::{check, wake_at, OcspError};

/// Signs the response's `tbsResponseData` again with the fixture CA's key, so mutations of
/// what the signature covers reach the checks after it. `None` when it does not parse that far.
pub(super) fn resign(der: &[u8]) -> Option<Vec<u8>> {
    let mut resp = OcspResponse::from_der(der).ok()?;
    let bytes = resp.response_bytes.as_mut()?;
    let mut basic = BasicOcspResponse::from_der(bytes.response.as_bytes()).ok()?;
    let tbs = basic.tbs_response_data.to_der().ok()?;
    let key = PrivatePkcs8KeyDer::from_pem_slice(include_bytes!("fixtures/ca.key"))
        .expect("fixture CA key");
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.secret_pkcs8_der())
        .expect("fixture CA key is P-256");
    let sig = key.sign(&SystemRandom::new(), &tbs).ok()?;
    basic.signature = BitString::from_bytes(sig.as_ref()).ok()?;
    bytes.response = OctetString::new(basic.to_der().ok()?).ok()?;
    resp.to_der().ok()
}

/// Mode byte bit 0: re-sign the response before checking it. A response accepted for stapling
/// is current at [`super::NOW_UNIX`] and schedules its refresh within its validity; a chain without the
/// issuer is always refused for that reason, whatever the bytes.
pub fn ocsp_response(data: &[u8]) {
    let Some((mode, body)) = data.split_first() else {
        return;
    };
    let response = if mode & 1 == 1 {
        resign(body).unwrap_or_else(|| body.to_vec())
    } else {
        body.to_vec()
    };
    let chain = fixture_chain();
    let now = now();
    assert_eq!(check(&response, &chain[..1], now), Err(OcspError::NoIssuer));
    match check(&response, &chain, now) {
        Ok(status) => {
            assert!(
                status.this_update <= now && now < status.next_update,
                "current at NOW"
            );
            let wake = wake_at(&status, now);
            assert!(
                wake > now && wake <= status.next_update,
                "refresh within the validity"
            );
        }
        Err(e) => assert!(!e.reason().is_empty() && !e.to_string().is_empty()),
    }
}
