//! PROXY protocol v2: what `conn::proxy_v2` encodes must decode (by the specification,
//! haproxy's proxy-protocol.txt section 2.2) to the same addresses and TLVs, and the client
//! identity TLVs built from an arbitrary certificate must be well-formed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rustls::pki_types::CertificateDer;

use super::input::Input;
use crate::conn::{identity, proxy_v2};

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// A decoded PROXY v2 header (PROXY or LOCAL command over TCP).
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    src: SocketAddr,
    dst: SocketAddr,
    tlvs: Vec<(u8, Vec<u8>)>,
    /// Header bytes, signature included.
    len: usize,
}

/// An independent decoder, written from the specification rather than from our encoder.
fn decode(b: &[u8]) -> Option<Decoded> {
    if b.len() < 16 || b[..12] != SIGNATURE || b[12] >> 4 != 2 || b[12] & 0x0F > 1 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([b[14], b[15]]));
    let body = b.get(16..16 + len)?;
    let (src, dst, tlvs) = match b[13] {
        0x11 => {
            let a = body.get(..12)?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
                &body[12..],
            )
        }
        0x21 => {
            let a = body.get(..36)?;
            let ip = |o: usize| {
                let mut x = [0u8; 16];
                x.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(x))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
                &body[36..],
            )
        }
        _ => return None,
    };
    Some(Decoded {
        src,
        dst,
        tlvs: decode_tlvs(tlvs)?,
        len: 16 + len,
    })
}

fn decode_tlvs(mut b: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let head = b.get(..3)?;
        let n = usize::from(u16::from_be_bytes([head[1], head[2]]));
        out.push((head[0], b.get(3..3 + n)?.to_vec()));
        b = &b[3 + n..];
    }
    Some(out)
}

fn encode_tlvs(tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, value) in tlvs {
        proxy_v2::push_tlv(&mut out, *kind, value);
    }
    out
}

fn addr(input: &mut Input<'_>, v6: bool) -> SocketAddr {
    let ip = if v6 {
        let mut x = [0u8; 16];
        x.copy_from_slice(&{
            let mut b = input.take(16).to_vec();
            b.resize(16, 0);
            b
        });
        IpAddr::V6(Ipv6Addr::from(x))
    } else {
        IpAddr::V4(Ipv4Addr::new(
            input.u8(),
            input.u8(),
            input.u8(),
            input.u8(),
        ))
    };
    let port = u16::from_be_bytes([input.u8(), input.u8()]);
    SocketAddr::new(ip, port)
}

/// How the encoder writes an address pair: v4 only when both are v4, else v6 (v4-mapped).
fn as_written(a: SocketAddr, both_v4: bool) -> SocketAddr {
    match (a.ip(), both_v4) {
        (IpAddr::V4(v4), false) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        _ => a,
    }
}

/// Mode byte 0: addresses and TLVs from the input, encoded then decoded. 1: the input is a
/// header; if it decodes, re-encoding its fields gives the same bytes. 2: the rest of the input
/// is a client certificate, and its identity TLVs form a well-formed header.
pub fn proxy_v2_round_trip(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => {
            let fam = input.u8();
            let client = addr(&mut input, fam & 1 != 0);
            let local = addr(&mut input, fam & 2 != 0);
            let mut tlvs = Vec::new();
            while !input.is_empty() {
                let kind = input.u8();
                let n = usize::from(input.u16());
                tlvs.push((kind, input.take(n).to_vec()));
            }
            check_encoding(client, local, &tlvs);
        }
        1 => {
            let bytes = input.rest();
            if let Some(d) = decode(bytes) {
                let both_v4 = d.src.is_ipv4() && d.dst.is_ipv4();
                let encoded = encode_tlvs(&d.tlvs);
                if bytes[12] == 0x21 && encoded.len() <= usize::from(u16::MAX) - 36 {
                    let again = proxy_v2::header_with_tlvs(d.src, d.dst, &encoded);
                    assert_eq!(again, &bytes[..d.len], "re-encoding a decoded header");
                    assert_eq!(both_v4, bytes[13] == 0x11);
                }
            }
        }
        _ => {
            let cert = CertificateDer::from(input.rest().to_vec());
            let certs = [cert];
            let facts = identity::Facts {
                version: Some(rustls::ProtocolVersion::TLSv1_3),
                suite: None,
                sni: Some("fuzz.example"),
                alpn: Some(b"h2"),
                peer_certs: Some(&certs),
                resumed: false,
            };
            let Some(tlvs) = identity::tlvs(&facts) else {
                panic!("a presented certificate always yields identity TLVs");
            };
            let parsed = decode_tlvs(&tlvs).expect("identity TLVs are well-formed");
            let ssl = parsed
                .iter()
                .find(|(k, _)| *k == identity::PP2_TYPE_SSL)
                .expect("the SSL TLV is always sent");
            assert!(ssl.1.len() >= 5, "client flags and verify come first");
            decode_tlvs(&ssl.1[5..]).expect("SSL sub-TLVs are well-formed");
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &certs[0]);
            assert!(parsed
                .iter()
                .any(|(k, v)| *k == identity::TLSGATE_TLV_CLIENT_SHA256 && v == digest.as_ref()));
            let client: SocketAddr = "192.0.2.7:40000".parse().expect("literal");
            let local: SocketAddr = "[2001:db8::1]:443".parse().expect("literal");
            check_encoding(client, local, &parsed);
        }
    }
}

fn check_encoding(client: SocketAddr, local: SocketAddr, tlvs: &[(u8, Vec<u8>)]) {
    let encoded_tlvs = encode_tlvs(tlvs);
    let header = proxy_v2::header_with_tlvs(client, local, &encoded_tlvs);
    let d = decode(&header).expect("our own header decodes");
    assert_eq!(
        d.len,
        header.len(),
        "the length field covers the whole header"
    );
    let both_v4 = client.is_ipv4() && local.is_ipv4();
    assert_eq!(d.src, as_written(client, both_v4));
    assert_eq!(d.dst, as_written(local, both_v4));
    // Values longer than a TLV holds are cut; TLVs that would overflow the header are left off.
    let expected: Vec<(u8, Vec<u8>)> = if encoded_tlvs.len() > usize::from(u16::MAX) - 36 {
        Vec::new()
    } else {
        tlvs.iter()
            .map(|(k, v)| (*k, v[..v.len().min(usize::from(u16::MAX))].to_vec()))
            .collect()
    };
    assert_eq!(d.tlvs, expected);
}
