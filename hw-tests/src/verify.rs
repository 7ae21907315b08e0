//! Independent signature checks with aws-lc-rs against an exported SPKI, so a test does not
//! trust the code it is testing to read its own public key.

use anyhow::{bail, Context as _, Result};
use aws_lc_rs::signature::{self as sig, UnparsedPublicKey};
use rustls::SignatureScheme;

fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The BIT STRING contents of an SPKI: the EC point, the RSAPublicKey, or the Ed25519 key.
pub fn spki_public_key(spki: &[u8]) -> Result<&[u8]> {
    let (_, seq, _) = tlv(spki).context("SPKI: not DER")?;
    let (_, _alg, rest) = tlv(seq).context("SPKI: no algorithm")?;
    let (tag, bits, _) = tlv(rest).context("SPKI: no key")?;
    if tag != 0x03 || bits.first() != Some(&0) {
        bail!("SPKI: malformed BIT STRING");
    }
    Ok(&bits[1..])
}

/// Verifies `signature` over `message` for `scheme` with the key in `spki`.
pub fn verify(
    spki: &[u8],
    scheme: SignatureScheme,
    message: &[u8],
    signature: &[u8],
) -> Result<()> {
    let alg: &'static dyn sig::VerificationAlgorithm = match scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256 => &sig::ECDSA_P256_SHA256_ASN1,
        SignatureScheme::ECDSA_NISTP384_SHA384 => &sig::ECDSA_P384_SHA384_ASN1,
        SignatureScheme::RSA_PSS_SHA256 => &sig::RSA_PSS_2048_8192_SHA256,
        SignatureScheme::RSA_PSS_SHA384 => &sig::RSA_PSS_2048_8192_SHA384,
        SignatureScheme::RSA_PSS_SHA512 => &sig::RSA_PSS_2048_8192_SHA512,
        SignatureScheme::RSA_PKCS1_SHA256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        SignatureScheme::RSA_PKCS1_SHA384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        SignatureScheme::RSA_PKCS1_SHA512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        SignatureScheme::ED25519 => &sig::ED25519,
        other => bail!("no verifier for {other:?}"),
    };
    UnparsedPublicKey::new(alg, spki_public_key(spki)?)
        .verify(message, signature)
        .map_err(|_| anyhow::anyhow!("{scheme:?} signature does not verify"))
}
