//! PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2), PROXY command over TCP,
//! with the TLS and client-certificate TLVs of [`crate::conn::identity`] when a client presented
//! a certificate.

use std::net::SocketAddr;

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Version 2, command PROXY.
const VER_CMD_PROXY: u8 = 0x21;
const FAM_TCP4: u8 = 0x11;
const FAM_TCP6: u8 = 0x21;

/// The header announcing `client` (source) and `local` (the address it connected to).
/// A mixed v4/v6 pair is written as v6 with v4-mapped addresses.
pub(crate) fn header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    header_with_tlvs(client, local, &[])
}

/// The header with `tlvs` (already encoded type-length-value records) after the addresses.
/// TLVs that would push the header past its 16-bit length are left off (they cannot: a
/// certificate's identity is far smaller, but the length must never wrap).
pub(crate) fn header_with_tlvs(client: SocketAddr, local: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let tlvs = if tlvs.len() > usize::from(u16::MAX) - 36 {
        &[][..]
    } else {
        tlvs
    };
    let mut out = Vec::with_capacity(16 + 36 + tlvs.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VER_CMD_PROXY);
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            out.push(FAM_TCP4);
            out.extend_from_slice(&(12 + tlvs.len() as u16).to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
        }
        (c, l) => {
            out.push(FAM_TCP6);
            out.extend_from_slice(&(36 + tlvs.len() as u16).to_be_bytes());
            out.extend_from_slice(&v6(c.ip()).octets());
            out.extend_from_slice(&v6(l.ip()).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out.extend_from_slice(tlvs);
    out
}

/// Appends one TLV; a value longer than a TLV can hold is cut at 65,535 bytes.
pub(crate) fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let value = &value[..value.len().min(usize::from(u16::MAX))];
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn v6(ip: std::net::IpAddr) -> std::net::Ipv6Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp4_header_layout() {
        let h = header(
            "10.1.2.3:40000".parse().expect("literal"),
            "192.0.2.1:443".parse().expect("literal"),
        );
        assert_eq!(h.len(), 28);
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(&h[14..16], &[0, 12]);
        assert_eq!(&h[16..20], &[10, 1, 2, 3]);
        assert_eq!(&h[20..24], &[192, 0, 2, 1]);
        assert_eq!(&h[24..26], &40000u16.to_be_bytes());
        assert_eq!(&h[26..28], &443u16.to_be_bytes());
    }

    #[test]
    fn tlvs_follow_the_addresses_and_count_in_the_length() {
        let mut tlvs = Vec::new();
        push_tlv(&mut tlvs, 0x02, b"example.com");
        push_tlv(&mut tlvs, 0xE1, &[7u8; 32]);
        let h = header_with_tlvs(
            "10.1.2.3:40000".parse().expect("literal"),
            "192.0.2.1:443".parse().expect("literal"),
            &tlvs,
        );
        assert_eq!(h.len(), 28 + tlvs.len());
        assert_eq!(u16::from_be_bytes([h[14], h[15]]) as usize, 12 + tlvs.len());
        assert_eq!(&h[28..31], &[0x02, 0, 11]);
        assert_eq!(&h[31..42], b"example.com");
        assert_eq!(&h[42..45], &[0xE1, 0, 32]);
        // A value too long for a TLV is cut, never wrapped into a wrong length.
        let mut big = Vec::new();
        push_tlv(&mut big, 0xE0, &vec![0u8; 70_000]);
        assert_eq!(&big[..3], &[0xE0, 0xFF, 0xFF]);
        assert_eq!(big.len(), 3 + 65_535);
        // TLVs that cannot fit the 16-bit header length are left off.
        let h = header_with_tlvs(
            "10.1.2.3:1".parse().expect("literal"),
            "192.0.2.1:2".parse().expect("literal"),
            &big,
        );
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn tcp6_header_layout() {
        let h = header(
            "[2001:db8::1]:1234".parse().expect("literal"),
            "10.0.0.1:443".parse().expect("literal"),
        );
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(h[13], 0x21);
        assert_eq!(&h[14..16], &[0, 36]);
    }
}
