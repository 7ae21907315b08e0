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
/// [`SecretBuf`]: no intermediate copy of the base64 text or the key is made. `None` when there
/// is no such block or its base64 is malformed (the input is never echoed).
pub fn pkcs8_der_from_pem(pem: &[u8]) -> Option<SecretBuf> {
    let start = find(pem, PEM_BEGIN)? + PEM_BEGIN.len();
    let body_len = find(&pem[start..], PEM_END)?;
    let body = &pem[start..start + body_len];
    let mut out = SecretBuf::with_capacity(body.len() / 4 * 3 + 3).ok()?;
    let mut quad = [0u8; 4];
    let mut n = 0;
    let mut padding = 0;
    for &c in body {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                padding += 1;
                0
            }
            b' ' | b'\t' | b'\r' | b'\n' => continue,
            _ => return None,
        };
        if padding > 0 && c != b'=' {
            return None;
        }
        quad[n] = v;
        n += 1;
        if n == 4 {
            let bytes = [
                (quad[0] << 2) | (quad[1] >> 4),
                (quad[1] << 4) | (quad[2] >> 2),
                (quad[2] << 6) | quad[3],
            ];
            let keep = match padding {
                0 => 3,
                1 => 2,
                2 => 1,
                _ => return None,
            };
            out.extend_from_slice(&bytes[..keep]).ok()?;
            n = 0;
        }
    }
    quad.zeroize();
    (n == 0 && !out.is_empty()).then_some(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in bytes.chunks(3) {
            let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
            let v = [
                b[0] >> 2,
                (b[0] & 3) << 4 | b[1] >> 4,
                (b[1] & 15) << 2 | b[2] >> 6,
                b[2] & 63,
            ];
            for (i, x) in v.iter().enumerate() {
                s.push(if i <= c.len() {
                    A[*x as usize] as char
                } else {
                    '='
                });
            }
        }
        s
    }

    #[test]
    fn pem_decodes_to_the_der_and_refuses_what_is_not_base64() {
        let der: Vec<u8> = (0u8..=200).collect();
        let b64 = encode(&der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        );
        let got = pkcs8_der_from_pem(pem.as_bytes()).expect("decodes");
        assert_eq!(got.as_bytes(), &der[..]);
        assert!(pkcs8_der_from_pem(pem.replace('A', "*").as_bytes()).is_none());
        assert!(pkcs8_der_from_pem(b"no pem here").is_none());
        assert!(pkcs8_der_from_pem(pem.replace("PRIVATE KEY", "CERTIFICATE").as_bytes()).is_none());
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
