//! Memory for secrets that must not outlive their use: a PIN kept for logging in again, the body
//! of a key import, the PEM and DER decoded from it.
//!
//! A [`SecretBuf`] owns pages of its own (an anonymous mapping), so nothing else shares them:
//! they are left out of core dumps (`MADV_DONTDUMP`), locked in memory where `RLIMIT_MEMLOCK`
//! allows (never written to swap), never reallocated (the capacity is fixed when it is made, so
//! no stale copy is left behind by a growing buffer), and wiped before they are unmapped.
//! `memmap2` gives safe wrappers for the mapping, `mlock` and `madvise`; this crate forbids
//! `unsafe`.

use std::fmt;

use memmap2::{Advice, MmapMut};
use zeroize::Zeroize;

/// A fixed-capacity byte buffer for secrets (see the module docs).
pub struct SecretBuf {
    map: MmapMut,
    len: usize,
}

/// The secret does not fit the buffer's fixed capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the secret is larger than its buffer ({capacity} bytes)")]
pub struct TooLarge {
    /// The buffer's capacity.
    pub capacity: usize,
}

impl SecretBuf {
    /// A buffer that holds up to `capacity` bytes. Fails only when the kernel refuses the
    /// mapping; a refused `mlock` (a low `RLIMIT_MEMLOCK`) is logged at debug and tolerated,
    /// since the pages are still out of core dumps and wiped.
    pub fn with_capacity(capacity: usize) -> std::io::Result<SecretBuf> {
        let map = MmapMut::map_anon(capacity.max(1))?;
        map.advise(Advice::DontDump)?;
        if let Err(err) = map.lock() {
            tracing::debug!(error = %err, bytes = capacity, "secret pages not locked in memory (RLIMIT_MEMLOCK)");
        }
        Ok(SecretBuf { map, len: 0 })
    }

    /// A buffer holding exactly `bytes`.
    pub fn from_slice(bytes: &[u8]) -> std::io::Result<SecretBuf> {
        let mut buf = SecretBuf::with_capacity(bytes.len())?;
        buf.map[..bytes.len()].copy_from_slice(bytes);
        buf.len = bytes.len();
        Ok(buf)
    }

    /// Appends `bytes`, or changes nothing when they do not fit.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> Result<(), TooLarge> {
        let end = self
            .len
            .checked_add(bytes.len())
            .filter(|&end| end <= self.capacity())
            .ok_or(TooLarge {
                capacity: self.capacity(),
            })?;
        self.map[self.len..end].copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    /// Appends one byte.
    pub fn push(&mut self, byte: u8) -> Result<(), TooLarge> {
        self.extend_from_slice(&[byte])
    }

    /// Lets `write` fill the unused capacity in place (a decoder writing straight into these
    /// pages, so no copy exists elsewhere) and keeps the first `n` bytes it reports writing.
    /// When it answers `None` (or more than it was given), what it wrote is wiped and nothing
    /// is kept.
    pub fn fill_with(&mut self, write: impl FnOnce(&mut [u8]) -> Option<usize>) -> Option<usize> {
        let start = self.len;
        let spare = &mut self.map[start..];
        match write(spare) {
            Some(n) if n <= spare.len() => {
                self.len = start + n;
                Some(n)
            }
            _ => {
                spare.zeroize();
                None
            }
        }
    }

    /// The bytes held.
    pub fn as_bytes(&self) -> &[u8] {
        &self.map[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The fixed capacity.
    pub fn capacity(&self) -> usize {
        self.map.len()
    }

    /// Wipes and forgets the bytes held.
    pub fn clear(&mut self) {
        self.map[..self.len].zeroize();
        self.len = 0;
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        self.map[..].zeroize();
    }
}

impl fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBuf({} bytes, redacted)", self.len)
    }
}

const PEM_BEGIN: &[u8] = b"-----BEGIN PRIVATE KEY-----";
const PEM_END: &[u8] = b"-----END PRIVATE KEY-----";

/// The DER of the first PKCS#8 `PRIVATE KEY` block of `pem`, decoded straight into a
/// [`SecretBuf`] by `pem-rfc7468` (RFC 7468's strict grammar: 64-character base64 lines, LF or
/// CRLF): no intermediate copy of the base64 text or the key is made (beyond the decoder's
/// 3-byte block buffer on the stack). Text before the block
/// and after it (another block, say) is ignored. `None` when there is no such block or it is
/// malformed (the input is never echoed).
pub fn pkcs8_der_from_pem(pem: &[u8]) -> Option<SecretBuf> {
    let start = find(pem, PEM_BEGIN)?;
    let mut end = start + find(&pem[start..], PEM_END)? + PEM_END.len();
    // The block's own line ending goes with it; what follows is not the decoder's business.
    for eol in [&b"\r\n"[..], b"\n"] {
        if pem[end..].starts_with(eol) {
            end += eol.len();
            break;
        }
    }
    let block = &pem[start..end];
    let mut out = SecretBuf::with_capacity(block.len() / 4 * 3 + 3).ok()?;
    out.fill_with(|buf| match pem_rfc7468::decode(block, buf) {
        Ok(("PRIVATE KEY", der)) => Some(der.len()),
        _ => None,
    })?;
    (!out.is_empty()).then_some(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    use pem_rfc7468::LineEnding;

    fn pem_of(der: &[u8], eol: LineEnding) -> String {
        pem_rfc7468::encode_string("PRIVATE KEY", eol, der).expect("encodes")
    }

    #[test]
    fn pem_decodes_to_the_der_with_lf_or_crlf_and_text_around_it() {
        let der: Vec<u8> = (0u8..=200).collect();
        for eol in [LineEnding::LF, LineEnding::CRLF] {
            let pem = pem_of(&der, eol);
            let got = pkcs8_der_from_pem(pem.as_bytes()).expect("decodes");
            assert_eq!(got.as_bytes(), &der[..], "{eol:?}");
            // Explanatory text before (as `openssl pkey -text` writes), another block after
            // (a combined key + certificate file), no final line ending.
            let around = format!(
                "Private-Key: (256 bit)\npriv: ...\n{pem}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            );
            let got = pkcs8_der_from_pem(around.as_bytes()).expect("decodes");
            assert_eq!(got.as_bytes(), &der[..], "{eol:?} with text around");
            let bare = pem.trim_end();
            let got = pkcs8_der_from_pem(bare.as_bytes()).expect("decodes");
            assert_eq!(
                got.as_bytes(),
                &der[..],
                "{eol:?} without a final line ending"
            );
        }
    }

    #[test]
    fn what_tlsgate_writes_decodes() {
        // rcgen writes the lab CA's and the tests' keys.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let got = pkcs8_der_from_pem(key.serialize_pem().as_bytes()).expect("rcgen PEM");
        assert_eq!(got.as_bytes(), &key.serialize_der()[..]);
        // OpenSSL's layout (64-character lines, LF) is `pem_of(.., LineEnding::LF)` above; real
        // `openssl genpkey` files are imported by mgmt's api_round_trip and key_bytes tests.
    }

    #[test]
    fn malformed_pem_is_refused() {
        let der: Vec<u8> = (0u8..=200).collect();
        let pem = pem_of(&der, LineEnding::LF);
        assert!(pkcs8_der_from_pem(pem.replace('A', "*").as_bytes()).is_none());
        assert!(pkcs8_der_from_pem(b"no pem here").is_none());
        assert!(pkcs8_der_from_pem(pem.replace("PRIVATE KEY", "CERTIFICATE").as_bytes()).is_none());
        // A character of the body missing, or the end boundary missing.
        let mut lines: Vec<&str> = pem.lines().collect();
        let short = &lines[2][1..];
        lines[2] = short;
        assert!(pkcs8_der_from_pem(lines.join("\n").as_bytes()).is_none());
        let cut = &pem[..pem.find("-----END").expect("end")];
        assert!(pkcs8_der_from_pem(cut.as_bytes()).is_none());
        // An empty block decodes to nothing, which is not a key.
        assert!(
            pkcs8_der_from_pem(b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")
                .is_none()
        );
    }

    #[test]
    fn a_refused_fill_keeps_and_leaves_nothing() {
        let mut b = SecretBuf::with_capacity(8).expect("map");
        b.extend_from_slice(b"ab").expect("fits");
        assert_eq!(
            b.fill_with(|spare| {
                spare[..3].copy_from_slice(b"xyz");
                None
            }),
            None
        );
        assert_eq!(b.as_bytes(), b"ab");
        assert_eq!(b.fill_with(|spare| Some(spare.len() + 1)), None);
        assert_eq!(
            b.fill_with(|spare| {
                spare[..2].copy_from_slice(b"cd");
                Some(2)
            }),
            Some(2)
        );
        assert_eq!(b.as_bytes(), b"abcd");
        // What the refused fill wrote past that was wiped.
        assert_eq!(b.map[4], 0);
    }

    #[test]
    fn holds_up_to_its_capacity_and_no_more() {
        let mut b = SecretBuf::with_capacity(4).expect("map");
        assert!(b.capacity() >= 4);
        let cap = b.capacity();
        b.extend_from_slice(b"ab").expect("fits");
        b.push(b'c').expect("fits");
        assert_eq!(b.as_bytes(), b"abc");
        let filler = vec![0u8; cap - 3];
        b.extend_from_slice(&filler).expect("fits exactly");
        assert_eq!(b.push(b'x'), Err(TooLarge { capacity: cap }));
        assert_eq!(b.len(), cap, "a refused append changes nothing");
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn debug_never_shows_the_bytes() {
        let b = SecretBuf::from_slice(b"1234-secret").expect("map");
        assert_eq!(format!("{b:?}"), "SecretBuf(11 bytes, redacted)");
    }
}
