//! The few DER structures the keystore builds or takes apart itself: SPKIs from token
//! attributes, ECDSA signature re-encoding, PKCS#8 fields for import. Everything here parses
//! bytes a token or a file supplied, so every function returns `None` on malformed input.

pub(crate) const TAG_INTEGER: u8 = 0x02;
pub(crate) const TAG_BIT_STRING: u8 = 0x03;
pub(crate) const TAG_OCTET_STRING: u8 = 0x04;
pub(crate) const TAG_NULL: u8 = 0x05;
pub(crate) const TAG_OID: u8 = 0x06;
pub(crate) const TAG_SEQUENCE: u8 = 0x30;

/// OID contents (without tag and length).
pub(crate) mod oid {
    pub const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    pub const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pub const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    pub const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    pub const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
}

/// Reads one TLV; returns (tag, contents, rest).
pub(crate) fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur in what we parse
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Reads one TLV and checks its tag.
pub(crate) fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, content, rest) = read_tlv(input)?;
    (t == tag).then_some((content, rest))
}

pub(crate) fn write_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A non-negative INTEGER from unsigned big-endian bytes, minimally encoded.
pub(crate) fn write_uint(bytes: &[u8]) -> Vec<u8> {
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    let trimmed = &bytes[skip..];
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    write_tlv(TAG_INTEGER, &content)
}

/// Unsigned big-endian bytes of a non-negative INTEGER's contents (leading zero dropped).
pub(crate) fn uint_bytes(content: &[u8]) -> Option<&[u8]> {
    match content {
        [] => None,
        [first, ..] if first & 0x80 != 0 => None,
        [0, rest @ ..] if !rest.is_empty() => Some(rest),
        _ => Some(content),
    }
}

fn algorithm_identifier(algorithm: &[u8], params: Option<&[u8]>) -> Vec<u8> {
    let mut content = write_tlv(TAG_OID, algorithm);
    if let Some(p) = params {
        content.extend_from_slice(p);
    }
    write_tlv(TAG_SEQUENCE, &content)
}

fn spki(alg_id: Vec<u8>, public_key: &[u8]) -> Vec<u8> {
    let mut bits = Vec::with_capacity(public_key.len() + 1);
    bits.push(0); // no unused bits
    bits.extend_from_slice(public_key);
    let mut content = alg_id;
    content.extend_from_slice(&write_tlv(TAG_BIT_STRING, &bits));
    write_tlv(TAG_SEQUENCE, &content)
}

/// SPKI of an EC key from the curve OID (contents) and the uncompressed point.
pub(crate) fn ec_spki(curve_oid: &[u8], point: &[u8]) -> Vec<u8> {
    let params = write_tlv(TAG_OID, curve_oid);
    spki(
        algorithm_identifier(oid::EC_PUBLIC_KEY, Some(&params)),
        point,
    )
}

/// PKCS#1 RSAPublicKey from unsigned big-endian modulus and exponent.
pub(crate) fn rsa_public_key(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let mut content = write_uint(modulus);
    content.extend_from_slice(&write_uint(exponent));
    write_tlv(TAG_SEQUENCE, &content)
}

/// SPKI of an RSA key (rsaEncryption with NULL parameters, as every CA writes it).
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let null = [TAG_NULL, 0];
    spki(
        algorithm_identifier(oid::RSA_ENCRYPTION, Some(&null)),
        &rsa_public_key(modulus, exponent),
    )
}

pub(crate) fn ed25519_spki(public_key: &[u8]) -> Vec<u8> {
    spki(algorithm_identifier(oid::ED25519, None), public_key)
}

/// CKA_EC_POINT is specified as a DER OCTET STRING around the point, but some modules return
/// the bare point: accept both (callers check the length for the curve).
pub(crate) fn unwrap_ec_point_any(value: &[u8]) -> Option<&[u8]> {
    match expect(value, TAG_OCTET_STRING) {
        Some((content, [])) => Some(content),
        _ if !value.is_empty() => Some(value),
        _ => None,
    }
}

/// Raw `r || s` (what CKM_ECDSA returns) to the DER `Ecdsa-Sig-Value` TLS and X.509 use.
pub(crate) fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut content = write_uint(r);
    content.extend_from_slice(&write_uint(s));
    Some(write_tlv(TAG_SEQUENCE, &content))
}

/// The pieces of an SPKI the keystore cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpkiParts<'a> {
    pub algorithm: &'a [u8],
    /// The parameters TLV (whole, tag included), if any.
    pub params: Option<&'a [u8]>,
    /// BIT STRING contents without the unused-bits byte.
    pub public_key: &'a [u8],
}

pub(crate) fn parse_spki(der: &[u8]) -> Option<SpkiParts<'_>> {
    let (seq, rest) = expect(der, TAG_SEQUENCE)?;
    if !rest.is_empty() {
        return None;
    }
    let (alg, seq_rest) = expect(seq, TAG_SEQUENCE)?;
    let (algorithm, params) = expect(alg, TAG_OID)?;
    let params = (!params.is_empty()).then_some(params);
    let (bits, tail) = expect(seq_rest, TAG_BIT_STRING)?;
    if !tail.is_empty() {
        return None;
    }
    let (&unused, public_key) = bits.split_first()?;
    if unused != 0 {
        return None;
    }
    Some(SpkiParts {
        algorithm,
        params,
        public_key,
    })
}

/// DigestInfo prefixes (RFC 8017 §9.2 note 1) for CKM_RSA_PKCS over an in-process hash.
pub(crate) const DIGEST_INFO_SHA256: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
pub(crate) const DIGEST_INFO_SHA384: &[u8] = &[
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];
pub(crate) const DIGEST_INFO_SHA512: &[u8] = &[
    0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05,
    0x00, 0x04, 0x40,
];

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tlv_long_lengths_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 70000] {
            let content = vec![0xab; len];
            let enc = write_tlv(TAG_OCTET_STRING, &content);
            let (tag, c, rest) = read_tlv(&enc).unwrap();
            assert_eq!((tag, c.len(), rest.len()), (TAG_OCTET_STRING, len, 0));
        }
        assert_eq!(read_tlv(&[0x04, 0x05, 1, 2]), None, "truncated");
        assert_eq!(read_tlv(&[0x04, 0x80]), None, "indefinite length");
    }

    #[test]
    fn uint_encoding_is_minimal_and_positive() {
        assert_eq!(write_uint(&[0x00, 0x00, 0x7f]), vec![0x02, 0x01, 0x7f]);
        assert_eq!(write_uint(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(write_uint(&[0, 0]), vec![0x02, 0x01, 0x00]);
        assert_eq!(uint_bytes(&[0x00, 0x80]), Some(&[0x80][..]));
        assert_eq!(uint_bytes(&[0x80]), None, "negative");
    }

    #[test]
    fn ecdsa_raw_to_der_matches_known_encoding() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[31] = 1;
        raw[63] = 2; // s = 2, leading zeros stripped
        let der = ecdsa_raw_to_der(&raw).unwrap();
        let (seq, rest) = expect(&der, TAG_SEQUENCE).unwrap();
        assert!(rest.is_empty());
        let (r, seq) = expect(seq, TAG_INTEGER).unwrap();
        let (s, seq) = expect(seq, TAG_INTEGER).unwrap();
        assert!(seq.is_empty());
        assert_eq!(r.len(), 33);
        assert_eq!((r[0], r[1]), (0, 0x80));
        assert_eq!(s, &[2]);
        assert_eq!(ecdsa_raw_to_der(&[1, 2, 3]), None);
    }

    #[test]
    fn ec_point_with_and_without_octet_string() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[7u8; 64]);
        let wrapped = write_tlv(TAG_OCTET_STRING, &point);
        assert_eq!(unwrap_ec_point_any(&wrapped), Some(&point[..]));
        assert_eq!(unwrap_ec_point_any(&point), Some(&point[..]));
        assert_eq!(unwrap_ec_point_any(&[]), None);
    }

    #[test]
    fn spki_builders_parse_back() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[9u8; 64]);
        let ec = ec_spki(oid::P256, &point);
        let parts = parse_spki(&ec).unwrap();
        assert_eq!(parts.algorithm, oid::EC_PUBLIC_KEY);
        assert_eq!(parts.params, Some(&write_tlv(TAG_OID, oid::P256)[..]));
        assert_eq!(parts.public_key, &point[..]);

        let rsa = rsa_spki(&[0xc0; 256], &[1, 0, 1]);
        let parts = parse_spki(&rsa).unwrap();
        assert_eq!(parts.algorithm, oid::RSA_ENCRYPTION);
        assert_eq!(parts.params, Some(&[TAG_NULL, 0][..]));
        let (seq, _) = expect(parts.public_key, TAG_SEQUENCE).unwrap();
        let (n, seq) = expect(seq, TAG_INTEGER).unwrap();
        let (e, _) = expect(seq, TAG_INTEGER).unwrap();
        assert_eq!(uint_bytes(n).unwrap(), &[0xc0; 256][..]);
        assert_eq!(e, &[1, 0, 1]);
    }

    #[test]
    fn spki_matches_aws_lc_rs_encoding() {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref()).unwrap();
        let point = kp.public_key().as_ref().to_vec();
        let theirs = kp.public_key().as_der().unwrap();
        assert_eq!(ec_spki(oid::P256, &point), theirs.as_ref());
    }
}
