//! OCSP stapling: a DER OCSP response per certificate, checked before it is stapled.
//!
//! A response is stapled only when all of this holds (RFC 6960):
//! - it is a `successful` basic response;
//! - it is signed by the certificate's issuer, or by a delegated responder whose certificate is
//!   in the response, is issued (signature checked) by that issuer, carries the
//!   `id-kp-OCSPSigning` extended key usage and is within its validity;
//! - one of its single responses is for this certificate: same serial, same issuer name hash and
//!   issuer key hash (SHA-1 or SHA-256, as the response says);
//! - that status is `good`;
//! - it is current: `thisUpdate <= now < nextUpdate` (a response without `nextUpdate` is refused:
//!   nothing would say when to stop stapling it).
//!
//! Anything else is an [`OcspError`] that names what failed; the caller logs it, counts it and
//! serves the certificate without a staple. Signatures are verified with aws-lc-rs; the response
//! is parsed with RustCrypto's `x509-ocsp`, the certificates with x509-parser.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use der::{Decode, Encode};
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tlsgate_keystore::keyinfo::KeyKind;
use x509_ocsp::{BasicOcspResponse, CertStatus, OcspResponse, OcspResponseStatus};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How far a response's `thisUpdate` may lie ahead of our clock and still be used: responders'
/// clocks drift, and `thisUpdate` has whole seconds. Five minutes, the leeway OpenSSL's
/// `OCSP_check_validity` is commonly given.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

const OID_OCSP_BASIC: &str = "1.3.6.1.5.5.7.48.1.1";
const OID_SHA1: &str = "1.3.14.3.2.26";
const OID_SHA256: &str = "2.16.840.1.101.3.4.2.1";

/// Why a response is not stapled. `reason()` is the metric label.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OcspError {
    /// Not DER, or not an OCSP response.
    #[error("not a DER OCSP response: {0}")]
    Parse(String),
    /// The responder answered with an error status (malformed request, try later, ...).
    #[error("the responder answered {0}")]
    NotSuccessful(String),
    /// The chain has no issuer certificate to check the response against.
    #[error("the chain has no issuer certificate (leaf only): cannot check an OCSP response")]
    NoIssuer,
    /// No single response is for this certificate.
    #[error("the response is not for this certificate (serial {serial})")]
    WrongCertificate {
        /// The leaf's serial, hex.
        serial: String,
    },
    /// Signed by neither the issuer nor a valid delegated responder.
    #[error("bad signature: not signed by the issuer or a delegated OCSP responder of it")]
    BadSignature,
    /// The certificate is revoked.
    #[error("the certificate is revoked")]
    Revoked,
    /// The responder does not know the certificate.
    #[error("the responder says the certificate's status is unknown")]
    Unknown,
    /// `thisUpdate` is further in the future than [`MAX_CLOCK_SKEW`].
    #[error("not yet valid: thisUpdate is in the future")]
    NotYetValid,
    /// `nextUpdate` has passed, or is absent.
    #[error("stale: nextUpdate has passed (or is absent)")]
    Stale,
}

impl OcspError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            OcspError::Parse(_) => "parse_error",
            OcspError::NotSuccessful(_) => "not_successful",
            OcspError::NoIssuer => "no_issuer",
            OcspError::WrongCertificate { .. } => "wrong_certificate",
            OcspError::BadSignature => "bad_signature",
            OcspError::Revoked => "revoked",
            OcspError::Unknown => "unknown",
            OcspError::NotYetValid => "not_yet_valid",
            OcspError::Stale => "stale",
        }
    }
}

/// What a checked response says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcspStatus {
    /// `thisUpdate`.
    pub this_update: SystemTime,
    /// `nextUpdate`: stop stapling (and fetch a new one) before this.
    pub next_update: SystemTime,
}

/// Checks `response` (DER) for `chain[0]` issued by `chain[1]` at `now`. See the module docs.
pub fn check(
    response: &[u8],
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<OcspStatus, OcspError> {
    let leaf_der = chain
        .first()
        .ok_or_else(|| OcspError::Parse("empty chain".into()))?;
    let issuer_der = chain.get(1).ok_or(OcspError::NoIssuer)?;
    let leaf = parse_cert(leaf_der)?;
    let issuer = parse_cert(issuer_der)?;

    let resp = OcspResponse::from_der(response).map_err(|e| OcspError::Parse(e.to_string()))?;
    if resp.response_status != OcspResponseStatus::Successful {
        return Err(OcspError::NotSuccessful(format!(
            "{:?}",
            resp.response_status
        )));
    }
    let bytes = resp
        .response_bytes
        .ok_or_else(|| OcspError::Parse("successful response without responseBytes".into()))?;
    if bytes.response_type.to_string() != OID_OCSP_BASIC {
        return Err(OcspError::Parse(format!(
            "response type {} is not id-pkix-ocsp-basic",
            bytes.response_type
        )));
    }
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes())
        .map_err(|e| OcspError::Parse(e.to_string()))?;

    // Signature first: nothing in an unsigned response is worth reading.
    let tbs = basic
        .tbs_response_data
        .to_der()
        .map_err(|e| OcspError::Parse(e.to_string()))?;
    let sig_oid = basic.signature_algorithm.oid.to_string();
    let sig = basic.signature.raw_bytes();
    let by_issuer = verify(&sig_oid, issuer.public_key().raw, &tbs, sig);
    if !by_issuer {
        let delegated = basic.certs.iter().flatten().any(|c| {
            let Ok(der) = c.to_der() else { return false };
            let Ok((_, d)) = X509Certificate::from_der(&der) else {
                return false;
            };
            is_delegate_of(&d, &issuer, now) && verify(&sig_oid, d.public_key().raw, &tbs, sig)
        });
        if !delegated {
            return Err(OcspError::BadSignature);
        }
    }

    let serial = leaf.tbs_certificate.raw_serial();
    let single = basic
        .tbs_response_data
        .responses
        .iter()
        .find(|r| {
            let id = &r.cert_id;
            let alg = match id.hash_algorithm.oid.to_string().as_str() {
                OID_SHA1 => &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
                OID_SHA256 => &aws_lc_rs::digest::SHA256,
                _ => return false,
            };
            let name_hash = aws_lc_rs::digest::digest(alg, issuer.subject().as_raw());
            let key_hash =
                aws_lc_rs::digest::digest(alg, &issuer.public_key().subject_public_key.data);
            strip_zeros(id.serial_number.as_bytes()) == strip_zeros(serial)
                && id.issuer_name_hash.as_bytes() == name_hash.as_ref()
                && id.issuer_key_hash.as_bytes() == key_hash.as_ref()
        })
        .ok_or_else(|| OcspError::WrongCertificate {
            serial: hex::encode(serial),
        })?;
    match single.cert_status {
        CertStatus::Good(_) => {}
        CertStatus::Revoked(_) => return Err(OcspError::Revoked),
        CertStatus::Unknown(_) => return Err(OcspError::Unknown),
    }
    let this_update = single.this_update.0.to_system_time();
    let next_update = single
        .next_update
        .map(|t| t.0.to_system_time())
        .ok_or(OcspError::Stale)?;
    // A responder's clock a little ahead of ours (or a response made within the second we read
    // the clock in: thisUpdate has whole seconds) is not a reason to drop a good staple.
    if this_update > now + MAX_CLOCK_SKEW {
        return Err(OcspError::NotYetValid);
    }
    if now >= next_update {
        return Err(OcspError::Stale);
    }
    Ok(OcspStatus {
        this_update,
        next_update,
    })
}

/// `key` with `response` stapled, after [`check`]; the chain is the key's own.
pub fn staple(
    key: &Arc<CertifiedKey>,
    response: Vec<u8>,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, OcspStatus), OcspError> {
    let status = check(&response, &key.cert, now)?;
    let mut ck = (**key).clone();
    ck.ocsp = Some(response);
    Ok((Arc::new(ck), status))
}

/// Gauge: `nextUpdate` of the stapled response, Unix seconds. Labels: `listener`, `certificate`
/// (the leaf's subject). Alert well before it: past it nothing is stapled.
pub const OCSP_NEXT_UPDATE_TIMESTAMP_SECONDS: &str =
    "tlsgate_ocsp_response_next_update_timestamp_seconds";
/// Counter: responses not stapled. Labels: `listener`, `certificate`, `reason`
/// ([`OcspError::reason`]).
pub const OCSP_RESPONSES_REFUSED_TOTAL: &str = "tlsgate_ocsp_responses_refused_total";

/// When to look at the responses again: three quarters into the validity of a response (to
/// pick up a fresh one before `nextUpdate`), or at `nextUpdate` once that point has passed (so
/// a response that was not replaced stops being stapled when it goes stale).
pub fn wake_at(status: &OcspStatus, now: SystemTime) -> SystemTime {
    let span = status
        .next_update
        .duration_since(status.this_update)
        .unwrap_or_default();
    let refresh = status.this_update + span.mul_f64(0.75);
    if refresh > now {
        refresh
    } else {
        status.next_update
    }
}

/// Where a certificate's OCSP response comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A DER file.
    File(std::path::PathBuf),
    /// The responder named in the leaf's Authority Information Access (HTTP).
    Fetch,
}

impl Source {
    pub(crate) fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Fetch => "responder (AIA)".into(),
        }
    }
}

/// How long a fetch from a responder may take (resolve, connect, request, answer) unless
/// `[ocsp] timeout_ms` says otherwise.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest OCSP answer accepted from a responder.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
const OID_AD_OCSP: &str = "1.3.6.1.5.5.7.48.1";

/// The leaf's OCSP responder URL (Authority Information Access, `id-ad-ocsp`).
pub fn responder_url(leaf: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityInfoAccess(aia) => {
                aia.accessdescs.iter().find_map(|d| {
                    match (&d.access_method.to_id_string(), &d.access_location) {
                        (m, GeneralName::URI(u)) if m == OID_AD_OCSP => Some((*u).to_owned()),
                        _ => None,
                    }
                })
            }
            _ => None,
        })
}

/// DER OCSPRequest for `chain[0]` issued by `chain[1]` (SHA-1 CertID, what responders expect;
/// no nonce, so responses can be cached and stapled).
pub fn request(chain: &[CertificateDer<'_>]) -> Result<Vec<u8>, OcspError> {
    let leaf = parse_cert(chain.first().ok_or(OcspError::NoIssuer)?)?;
    let issuer = parse_cert(chain.get(1).ok_or(OcspError::NoIssuer)?)?;
    let alg = &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY;
    let name_hash = aws_lc_rs::digest::digest(alg, issuer.subject().as_raw());
    let key_hash = aws_lc_rs::digest::digest(alg, &issuer.public_key().subject_public_key.data);
    // AlgorithmIdentifier { id-sha1, NULL }
    let sha1 = [
        0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00,
    ];
    let mut cert_id = sha1.to_vec();
    cert_id.extend(tlv(0x04, name_hash.as_ref()));
    cert_id.extend(tlv(0x04, key_hash.as_ref()));
    cert_id.extend(tlv(0x02, leaf.tbs_certificate.raw_serial()));
    let request = tlv(0x30, &tlv(0x30, &cert_id));
    let request_list = tlv(0x30, &request);
    let tbs = tlv(0x30, &request_list);
    Ok(tlv(0x30, &tbs))
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = (n as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// Asks the leaf's responder (HTTP POST, RFC 6960 appendix A) for a response, within `timeout`
/// for everything (name resolution, connect, request, answer). Only `http://` URLs: OCSP
/// responses are signed, the transport needs no TLS. Async all the way (tokio's resolver and
/// sockets, hyper's HTTP/1.1 client): a silent responder holds only this future, and dropping it
/// (the timeout) closes the connection.
pub async fn fetch(chain: &[CertificateDer<'_>], timeout: Duration) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let leaf = chain.first().context("empty chain")?;
    let url = responder_url(leaf).context("the certificate names no OCSP responder (AIA)")?;
    let body = request(chain)?;
    tokio::time::timeout(timeout, fetch_from(&url, body))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no complete answer within {timeout:?}"))?
}

async fn fetch_from(url: &str, body: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    use anyhow::{bail, Context};
    use http_body_util::{BodyExt, Full, Limited};
    let uri: hyper::Uri = url.parse().with_context(|| format!("{url}: not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("{url}: only http:// responders are supported");
    }
    let host = uri.host().with_context(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("{url}: cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{url}: {host} has no address"))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("{url}: cannot connect"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .with_context(|| format!("{url}: HTTP handshake"))?;
    // The connection runs beside the request; it ends with this function (or its timeout).
    let _conn = AbortOnDrop(tokio::spawn(conn));
    let authority = uri.authority().map_or(host, |a| a.as_str()).to_owned();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/ocsp-request")
        .body(Full::new(hyper::body::Bytes::from(body)))
        .with_context(|| format!("{url}: request"))?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{url}: sending the request"))?;
    if resp.status() != hyper::StatusCode::OK {
        bail!("{url}: responder answered {}", resp.status());
    }
    let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("{url}: reading the answer: {e}"))?
        .to_bytes();
    Ok(body.to_vec())
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn parse_cert<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, OcspError> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| OcspError::Parse(format!("certificate: {e}")))
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|x| **x == 0).count();
    &b[n..]
}

/// A delegated responder: issued by `issuer` (signature checked), `id-kp-OCSPSigning`, valid now.
fn is_delegate_of(d: &X509Certificate<'_>, issuer: &X509Certificate<'_>, now: SystemTime) -> bool {
    let ocsp_signing = matches!(d.extended_key_usage(), Ok(Some(eku)) if eku.value.ocsp_signing);
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let valid =
        d.validity().not_before.timestamp() <= secs && secs < d.validity().not_after.timestamp();
    ocsp_signing
        && valid
        && d.issuer().as_raw() == issuer.subject().as_raw()
        && verify(
            &d.signature_algorithm.algorithm.to_id_string(),
            issuer.public_key().raw,
            d.tbs_certificate.as_ref(),
            &d.signature_value.data,
        )
}

/// Verifies `sig` over `msg` with the key in `spki` (DER), for signature algorithm `oid`.
fn verify(oid: &str, spki: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    use aws_lc_rs::signature as s;
    let Ok(kind) = KeyKind::from_spki(spki) else {
        return false;
    };
    let alg: &'static dyn s::VerificationAlgorithm = match (oid, kind) {
        ("1.2.840.10045.4.3.2", KeyKind::EcP256) => &s::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", KeyKind::EcP256) => &s::ECDSA_P256_SHA384_ASN1,
        ("1.2.840.10045.4.3.2", KeyKind::EcP384) => &s::ECDSA_P384_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", KeyKind::EcP384) => &s::ECDSA_P384_SHA384_ASN1,
        ("1.2.840.113549.1.1.11", KeyKind::Rsa { .. }) => &s::RSA_PKCS1_2048_8192_SHA256,
        ("1.2.840.113549.1.1.12", KeyKind::Rsa { .. }) => &s::RSA_PKCS1_2048_8192_SHA384,
        ("1.2.840.113549.1.1.13", KeyKind::Rsa { .. }) => &s::RSA_PKCS1_2048_8192_SHA512,
        ("1.3.101.112", KeyKind::Ed25519) => &s::ED25519,
        _ => return false,
    };
    let Ok((_, spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki) else {
        return false;
    };
    s::UnparsedPublicKey::new(alg, &spki.subject_public_key.data)
        .verify(msg, sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_parse_error_and_a_leaf_alone_has_no_issuer() {
        let leaf = CertificateDer::from(vec![0x30, 0x00]);
        assert_eq!(
            check(b"not der", std::slice::from_ref(&leaf), SystemTime::now()),
            Err(OcspError::NoIssuer)
        );
        let err = check(b"not der", &[leaf.clone(), leaf], SystemTime::now()).expect_err("bad");
        assert_eq!(err.reason(), "parse_error");
    }
}
