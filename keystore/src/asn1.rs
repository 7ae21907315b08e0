//! The few DER structures the keystore builds or takes apart itself — SPKIs from token
//! attributes, ECDSA signature re-encoding, the curve parameters a token wants — on RustCrypto's
//! `der`, `spki` and `pkcs1` types. (PKCS#8 imports are taken apart in [`crate::software`] with
//! `pkcs8` and `sec1`.) Everything here parses bytes a token or a file supplied: malformed input
//! is an error, never a panic.

use der::asn1::{AnyRef, BitStringRef, ObjectIdentifier, OctetStringRef, SequenceOf, UintRef};
use der::{Decode, Encode};
use spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoRef};

/// The object identifiers the keystore knows.
pub(crate) mod oid {
    use der::asn1::ObjectIdentifier;

    /// id-ecPublicKey (RFC 5480).
    pub const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
    /// secp256r1 / P-256.
    pub const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
    /// secp384r1 / P-384.
    pub const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
    /// rsaEncryption (RFC 8017).
    pub const RSA_ENCRYPTION: ObjectIdentifier =
        ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
    /// id-Ed25519 (RFC 8410).
    pub const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
}

/// The DER of an OBJECT IDENTIFIER (what `CKA_EC_PARAMS` holds for a named curve).
pub(crate) fn oid_der(oid: ObjectIdentifier) -> der::Result<Vec<u8>> {
    oid.to_der()
}

/// A DER OCTET STRING around `bytes` (what `CKA_EC_POINT` holds).
pub(crate) fn octet_string(bytes: &[u8]) -> der::Result<Vec<u8>> {
    OctetStringRef::new(bytes)?.to_der()
}

fn spki(
    algorithm: ObjectIdentifier,
    parameters: Option<AnyRef<'_>>,
    public_key: &[u8],
) -> der::Result<Vec<u8>> {
    SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef {
            oid: algorithm,
            parameters,
        },
        subject_public_key: BitStringRef::from_bytes(public_key)?,
    }
    .to_der()
}

/// SPKI of an EC key from its named curve and the uncompressed point.
pub(crate) fn ec_spki(curve: ObjectIdentifier, point: &[u8]) -> der::Result<Vec<u8>> {
    spki(oid::EC_PUBLIC_KEY, Some(AnyRef::from(&curve)), point)
}

/// SPKI of an RSA key (rsaEncryption with NULL parameters, as every CA writes it) from the
/// unsigned big-endian modulus and exponent.
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> der::Result<Vec<u8>> {
    let public = pkcs1::RsaPublicKey {
        modulus: UintRef::new(modulus)?,
        public_exponent: UintRef::new(exponent)?,
    }
    .to_der()?;
    spki(oid::RSA_ENCRYPTION, Some(AnyRef::NULL), &public)
}

pub(crate) fn ed25519_spki(public_key: &[u8]) -> der::Result<Vec<u8>> {
    spki(oid::ED25519, None, public_key)
}

/// CKA_EC_POINT is specified as a DER OCTET STRING around the point, but some modules return
/// the bare point: accept both (callers check the length for the curve).
pub(crate) fn unwrap_ec_point_any(value: &[u8]) -> Option<&[u8]> {
    match OctetStringRef::from_der(value) {
        Ok(inner) => Some(inner.as_bytes()),
        Err(_) if !value.is_empty() => Some(value),
        Err(_) => None,
    }
}

/// The named curve in `CKA_EC_PARAMS` (an OBJECT IDENTIFIER), if it is one.
pub(crate) fn named_curve(params: &[u8]) -> Option<ObjectIdentifier> {
    ObjectIdentifier::from_der(params).ok()
}

/// Raw `r || s` (what CKM_ECDSA returns) to the DER `Ecdsa-Sig-Value` TLS and X.509 use.
pub(crate) fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut sig = SequenceOf::<UintRef<'_>, 2>::new();
    sig.add(UintRef::new(r).ok()?).ok()?;
    sig.add(UintRef::new(s).ok()?).ok()?;
    sig.to_der().ok()
}

/// The pieces of an SPKI the keystore cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpkiParts<'a> {
    pub algorithm: ObjectIdentifier,
    /// The algorithm parameters, if any.
    pub params: Option<AnyRef<'a>>,
    /// BIT STRING contents (a whole number of bytes).
    pub public_key: &'a [u8],
}

pub(crate) fn parse_spki(der: &[u8]) -> Option<SpkiParts<'_>> {
    let spki = SubjectPublicKeyInfoRef::from_der(der).ok()?;
    Some(SpkiParts {
        algorithm: spki.algorithm.oid,
        params: spki.algorithm.parameters,
        public_key: spki.subject_public_key.as_bytes()?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_raw_to_der_is_minimal_and_positive() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[31] = 1;
        raw[63] = 2; // s = 2, leading zeros stripped
        let der = ecdsa_raw_to_der(&raw).unwrap();
        // SEQUENCE { INTEGER (33 bytes: 00 80 ...), INTEGER 2 }
        assert_eq!(&der[..5], &[0x30, 38, 0x02, 33, 0x00]);
        assert_eq!(der[5], 0x80);
        assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x02]);
        assert_eq!(der.len(), 2 + 2 + 33 + 3);
        assert_eq!(ecdsa_raw_to_der(&[1, 2, 3]), None);
        assert_eq!(ecdsa_raw_to_der(&[]), None);
        // All-zero halves encode as INTEGER 0.
        assert_eq!(
            ecdsa_raw_to_der(&[0, 0]).unwrap(),
            vec![0x30, 6, 0x02, 1, 0, 0x02, 1, 0]
        );
    }

    #[test]
    fn ec_point_with_and_without_octet_string() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[7u8; 64]);
        let wrapped = octet_string(&point).unwrap();
        assert_eq!(unwrap_ec_point_any(&wrapped), Some(&point[..]));
        assert_eq!(unwrap_ec_point_any(&point), Some(&point[..]));
        assert_eq!(unwrap_ec_point_any(&[]), None);
    }

    #[test]
    fn spki_builders_parse_back() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[9u8; 64]);
        let ec = ec_spki(oid::P256, &point).unwrap();
        let parts = parse_spki(&ec).unwrap();
        assert_eq!(parts.algorithm, oid::EC_PUBLIC_KEY);
        assert_eq!(
            parts
                .params
                .unwrap()
                .decode_as::<ObjectIdentifier>()
                .unwrap(),
            oid::P256
        );
        assert_eq!(parts.public_key, &point[..]);

        let rsa = rsa_spki(&[0xc0; 256], &[1, 0, 1]).unwrap();
        let parts = parse_spki(&rsa).unwrap();
        assert_eq!(parts.algorithm, oid::RSA_ENCRYPTION);
        assert!(parts.params.unwrap().is_null());
        let public = pkcs1::RsaPublicKey::from_der(parts.public_key).unwrap();
        assert_eq!(public.modulus.as_bytes(), &[0xc0; 256][..]);
        assert_eq!(public.public_exponent.as_bytes(), &[1, 0, 1]);

        assert_eq!(parse_spki(&rsa[..rsa.len() - 1]), None, "truncated");
        assert_eq!(named_curve(&oid_der(oid::P384).unwrap()), Some(oid::P384));
        assert_eq!(named_curve(b"\x13\x0cedwards25519"), None);
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
        assert_eq!(ec_spki(oid::P256, &point).unwrap(), theirs.as_ref());
    }

    #[test]
    fn rsa_spki_matches_aws_lc_rs_encoding() {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair;
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let public = kp.public_key();
        let theirs = public.as_der().unwrap();
        let parts = parse_spki(theirs.as_ref()).unwrap();
        let rsa = pkcs1::RsaPublicKey::from_der(parts.public_key).unwrap();
        let ours = rsa_spki(rsa.modulus.as_bytes(), rsa.public_exponent.as_bytes()).unwrap();
        assert_eq!(ours, theirs.as_ref());
    }
}
