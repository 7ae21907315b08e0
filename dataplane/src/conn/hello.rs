//! A look at the raw ClientHello flight for signs of a resumption attempt.
//!
//! Only a hint for the offload decision: a hello that may resume runs inline under the tripwire
//! config (a resumption needs no signature); a full handshake goes straight to a key-op worker so
//! its key exchange is not computed twice. A wrong hint costs CPU, never correctness: the
//! tripwire catches a full handshake that slipped through. rustls has already parsed and accepted
//! the same bytes when this runs.

const RECORD_HANDSHAKE: u8 = 22;
const HS_CLIENT_HELLO: u8 = 1;
const EXT_SESSION_TICKET: u16 = 35;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// Whether the ClientHello in `flight` (TLS records, possibly fragmented) may resume a session.
/// Returns `true` when the bytes cannot be read, so the caller takes the safe path.
pub(crate) fn may_resume(flight: &[u8]) -> bool {
    match scan(flight) {
        Some(Hint {
            psk,
            ticket,
            session_id,
            tls13,
        }) => psk || ticket || (session_id && !tls13),
        None => true,
    }
}

struct Hint {
    psk: bool,
    ticket: bool,
    session_id: bool,
    tls13: bool,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

fn scan(flight: &[u8]) -> Option<Hint> {
    // Reassemble handshake bytes from as many records as the flight holds.
    let mut hs = Vec::new();
    let mut rd = Reader(flight);
    while !rd.0.is_empty() {
        let typ = rd.u8()?;
        rd.take(2)?;
        let len = usize::from(rd.u16()?);
        let body = rd.take(len)?;
        if typ != RECORD_HANDSHAKE {
            break;
        }
        hs.extend_from_slice(body);
    }
    let mut m = Reader(&hs);
    if m.u8()? != HS_CLIENT_HELLO {
        return None;
    }
    let len = m.u24()?;
    let mut ch = Reader(m.take(len)?);
    ch.take(2 + 32)?;
    let sid_len = usize::from(ch.u8()?);
    ch.take(sid_len)?;
    let suites = usize::from(ch.u16()?);
    ch.take(suites)?;
    let comp = usize::from(ch.u8()?);
    ch.take(comp)?;
    let mut hint = Hint {
        psk: false,
        ticket: false,
        session_id: sid_len > 0,
        tls13: false,
    };
    if ch.0.is_empty() {
        return Some(hint);
    }
    let ext_len = usize::from(ch.u16()?);
    let mut exts = Reader(ch.take(ext_len)?);
    while !exts.0.is_empty() {
        let typ = exts.u16()?;
        let len = usize::from(exts.u16()?);
        exts.take(len)?;
        match typ {
            EXT_PRE_SHARED_KEY => hint.psk = true,
            EXT_SESSION_TICKET if len > 0 => hint.ticket = true,
            EXT_SUPPORTED_VERSIONS => hint.tls13 = true,
            _ => {}
        }
    }
    Some(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_takes_the_safe_path() {
        assert!(may_resume(b"GET / HTTP/1.1\r\n"));
        assert!(may_resume(&[]));
    }

    #[test]
    fn minimal_hello_without_resumption() {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&[0, 4, 0, 43, 0, 0]);
        let mut hs = vec![HS_CLIENT_HELLO, 0, 0, body.len() as u8];
        hs.extend_from_slice(&body);
        let mut rec = vec![RECORD_HANDSHAKE, 3, 1, 0, hs.len() as u8];
        rec.extend_from_slice(&hs);
        assert!(!may_resume(&rec));
        // Same hello with a PSK extension appended.
        let mut body2 = body.clone();
        let n = body2.len();
        body2[n - 5] = 8;
        body2.extend_from_slice(&[0, 41, 0, 0]);
        let mut hs2 = vec![HS_CLIENT_HELLO, 0, 0, body2.len() as u8];
        hs2.extend_from_slice(&body2);
        let mut rec2 = vec![RECORD_HANDSHAKE, 3, 1, 0, hs2.len() as u8];
        rec2.extend_from_slice(&hs2);
        assert!(may_resume(&rec2));
    }
}
