//! The client's TLS identity as PROXY protocol v2 TLVs, for backends behind an mTLS listener.
//!
//! Sent when `proxy_protocol` is on and the client presented a certificate that the listener's
//! verifier accepted (rustls completes no handshake otherwise). Without a client certificate,
//! a connection whose pool negotiated an ALPN protocol gets the `PP2_TYPE_ALPN` TLV alone. The PROXY header is
//! built when the client handshake completes, which is also when the backend connect starts, so
//! the identity is always known by the time the header goes out.
//!
//! Layout (types from HAProxy's proxy-protocol.txt, section 2.2, and the custom range 0xE0-0xEF):
//!
//! | type | name | value |
//! |---|---|---|
//! | 0x02 | `PP2_TYPE_AUTHORITY` | the SNI host name the client sent (when it sent one) |
//! | 0x01 | `PP2_TYPE_ALPN` | the negotiated ALPN protocol (when one was) |
//! | 0x20 | `PP2_TYPE_SSL` | `client` (u8: 0x01 SSL, 0x02 certificate on this connection, 0x04 certificate from a resumed session), `verify` (u32 BE, 0 = verified), then sub-TLVs: |
//! | 0x21 | `PP2_SUBTYPE_SSL_VERSION` | `TLSv1.3` / `TLSv1.2` |
//! | 0x22 | `PP2_SUBTYPE_SSL_CN` | the leaf's subject common name (UTF-8), when it has one |
//! | 0x23 | `PP2_SUBTYPE_SSL_CIPHER` | the suite, OpenSSL spelling (`TLS_AES_256_GCM_SHA384`, `ECDHE-ECDSA-AES256-GCM-SHA384`) |
//! | 0x24 | `PP2_SUBTYPE_SSL_SIG_ALG` | the leaf's signature algorithm, OpenSSL short name (`ecdsa-with-SHA256`, `RSA-SHA256`, `RSASSA-PSS`, `ED25519`) |
//! | 0x25 | `PP2_SUBTYPE_SSL_KEY_ALG` | the leaf's key: `EC256`, `EC384`, `RSA2048`, `ED25519`, ... |
//! | 0xE0 | `TLSGATE_TLV_CLIENT_SAN` | one per subject alternative name: `DNS:name`, `IP:addr`, `email:addr`, `URI:uri` |
//! | 0xE1 | `TLSGATE_TLV_CLIENT_SHA256` | SHA-256 of the leaf certificate's DER (32 bytes: the fingerprint) |
//! | 0xE2 | `TLSGATE_TLV_CLIENT_SUBJECT` | the leaf's subject DN, RFC 4514 string |
//!
//! A leaf x509-parser cannot read still gets the SSL TLV (version, cipher) and the fingerprint.

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::proxy_v2::push_tlv;

/// `PP2_TYPE_ALPN`.
pub const PP2_TYPE_ALPN: u8 = 0x01;
/// `PP2_TYPE_AUTHORITY` (SNI).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// `PP2_TYPE_SSL`.
pub const PP2_TYPE_SSL: u8 = 0x20;
/// `PP2_SUBTYPE_SSL_VERSION`.
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
/// `PP2_SUBTYPE_SSL_CN`.
pub const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
/// `PP2_SUBTYPE_SSL_CIPHER`.
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// `PP2_SUBTYPE_SSL_SIG_ALG`.
pub const PP2_SUBTYPE_SSL_SIG_ALG: u8 = 0x24;
/// `PP2_SUBTYPE_SSL_KEY_ALG`.
pub const PP2_SUBTYPE_SSL_KEY_ALG: u8 = 0x25;
/// One subject alternative name of the client certificate (custom range).
pub const TLSGATE_TLV_CLIENT_SAN: u8 = 0xE0;
/// SHA-256 fingerprint of the client certificate (custom range).
pub const TLSGATE_TLV_CLIENT_SHA256: u8 = 0xE1;
/// Subject DN of the client certificate (custom range).
pub const TLSGATE_TLV_CLIENT_SUBJECT: u8 = 0xE2;

/// `client` flags of `PP2_TYPE_SSL`.
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// What the finished client handshake tells about the client.
pub(crate) struct Facts<'a> {
    pub version: Option<rustls::ProtocolVersion>,
    pub suite: Option<rustls::SupportedCipherSuite>,
    pub sni: Option<&'a str>,
    pub alpn: Option<&'a [u8]>,
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
    pub resumed: bool,
}

/// The encoded TLVs, or `None` when the client presented no certificate (the plain header then
/// goes out, as before mTLS).
/// The TLV of a connection without a client certificate: the negotiated protocol
/// (`PP2_TYPE_ALPN`) when a pool negotiated one; `None` otherwise (the plain header).
pub(crate) fn plain_tlvs(f: &Facts<'_>) -> Option<Vec<u8>> {
    let alpn = f.alpn?;
    let mut out = Vec::new();
    push_tlv(&mut out, PP2_TYPE_ALPN, alpn);
    Some(out)
}

pub(crate) fn tlvs(f: &Facts<'_>) -> Option<Vec<u8>> {
    let leaf = f.peer_certs?.first()?;
    let mut out = Vec::with_capacity(512);
    if let Some(sni) = f.sni {
        push_tlv(&mut out, PP2_TYPE_AUTHORITY, sni.as_bytes());
    }
    if let Some(alpn) = f.alpn {
        push_tlv(&mut out, PP2_TYPE_ALPN, alpn);
    }
    let parsed = X509Certificate::from_der(leaf.as_ref())
        .ok()
        .map(|(_, c)| c);

    let mut ssl = Vec::with_capacity(128);
    let cert_flag = if f.resumed {
        PP2_CLIENT_CERT_SESS
    } else {
        PP2_CLIENT_CERT_CONN
    };
    ssl.push(PP2_CLIENT_SSL | cert_flag);
    // rustls completes a handshake only with a certificate its verifier accepted.
    ssl.extend_from_slice(&0u32.to_be_bytes());
    let version = match f.version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    push_tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, version.as_bytes());
    if let Some(cn) = parsed.as_ref().and_then(common_name) {
        push_tlv(&mut ssl, PP2_SUBTYPE_SSL_CN, cn.as_bytes());
    }
    if let Some(suite) = f.suite {
        push_tlv(
            &mut ssl,
            PP2_SUBTYPE_SSL_CIPHER,
            openssl_suite_name(suite).as_bytes(),
        );
    }
    if let Some(c) = &parsed {
        push_tlv(
            &mut ssl,
            PP2_SUBTYPE_SSL_SIG_ALG,
            sig_alg_name(c).as_bytes(),
        );
        push_tlv(
            &mut ssl,
            PP2_SUBTYPE_SSL_KEY_ALG,
            key_alg_name(c).as_bytes(),
        );
    }
    push_tlv(&mut out, PP2_TYPE_SSL, &ssl);

    if let Some(c) = &parsed {
        for san in sans(c) {
            push_tlv(&mut out, TLSGATE_TLV_CLIENT_SAN, san.as_bytes());
        }
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    push_tlv(&mut out, TLSGATE_TLV_CLIENT_SHA256, digest.as_ref());
    if let Some(c) = &parsed {
        push_tlv(
            &mut out,
            TLSGATE_TLV_CLIENT_SUBJECT,
            c.subject().to_string().as_bytes(),
        );
    }
    Some(out)
}

fn common_name(c: &X509Certificate<'_>) -> Option<String> {
    c.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

fn sans(c: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(ext)) = c.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(format!("DNS:{d}")),
            GeneralName::RFC822Name(e) => Some(format!("email:{e}")),
            GeneralName::URI(u) => Some(format!("URI:{u}")),
            GeneralName::IPAddress(b) => match b.len() {
                4 => {
                    let a: [u8; 4] = (*b).try_into().ok()?;
                    Some(format!("IP:{}", std::net::Ipv4Addr::from(a)))
                }
                16 => {
                    let a: [u8; 16] = (*b).try_into().ok()?;
                    Some(format!("IP:{}", std::net::Ipv6Addr::from(a)))
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn sig_alg_name(c: &X509Certificate<'_>) -> String {
    let oid = c.signature_algorithm.algorithm.to_id_string();
    match oid.as_str() {
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512",
        "1.2.840.113549.1.1.11" => "RSA-SHA256",
        "1.2.840.113549.1.1.12" => "RSA-SHA384",
        "1.2.840.113549.1.1.13" => "RSA-SHA512",
        "1.2.840.113549.1.1.10" => "RSASSA-PSS",
        "1.3.101.112" => "ED25519",
        _ => return oid,
    }
    .to_owned()
}

fn key_alg_name(c: &X509Certificate<'_>) -> String {
    match c.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA{}", rsa.key_size()),
        Ok(PublicKey::EC(ec)) => format!("EC{}", ec.key_size()),
        _ => {
            let oid = c.public_key().algorithm.algorithm.to_id_string();
            match oid.as_str() {
                "1.3.101.112" => "ED25519".to_owned(),
                "1.3.101.113" => "ED448".to_owned(),
                _ => oid,
            }
        }
    }
}

/// OpenSSL's name for a suite (what HAProxy sends); rustls's own name for any other.
fn openssl_suite_name(s: rustls::SupportedCipherSuite) -> &'static str {
    use rustls::CipherSuite as C;
    match s.suite() {
        C::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        C::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        C::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other.as_str().unwrap_or("unknown"),
    }
}
