//! Which path a ClientHello takes on a listener whose keys are on a token: a look at the raw
//! flight for signs of a resumption attempt.
//!
//! Only a hint for the offload decision: a hello that may resume runs inline under the tripwire
//! config ([`super::tripwire`]; a resumption needs no signature); a full handshake goes straight
//! to a key-op worker so its key exchange is not computed twice. A wrong hint costs CPU, never
//! correctness: the tripwire catches a full handshake that slipped through. rustls has already
//! parsed and accepted the same bytes when this runs.
//!
//! A non-empty legacy session id alone says nothing: every TLS 1.3-capable client sends a random
//! one, and rustls clients send `supported_versions` even when they offer only TLS 1.2. So a
//! session id counts only when the server's own session store knows it, which is the lookup
//! rustls makes next for a TLS 1.2 resumption anyway.

use rustls::server::{ServerConnection, StoresServerSessions};
use rustls::HandshakeKind;

const RECORD_HANDSHAKE: u8 = 22;
const HS_CLIENT_HELLO: u8 = 1;
const EXT_SESSION_TICKET: u16 = 35;
const EXT_PRE_SHARED_KEY: u16 = 41;

/// Whether the ClientHello in `flight` (TLS records, possibly fragmented) may resume a session
/// offered by a PSK, a ticket, or a session id that `sessions` holds. Returns `true` when the
/// bytes cannot be read, so the caller takes the safe path.
pub(crate) fn may_resume(flight: &[u8], sessions: &dyn StoresServerSessions) -> bool {
    match scan(flight) {
        Some(Hint {
            psk,
            ticket,
            session_id,
        }) => {
            psk || ticket
                || (!session_id.is_empty()
                    && sessions.can_cache()
                    && sessions.get(&session_id).is_some())
        }
        None => true,
    }
}

/// A TLS 1.3 connection that sent a HelloRetryRequest and has not answered the second
/// ClientHello yet (no key exchange done): processing that hello may sign, so on an offloaded
/// listener it happens on a key-op worker.
pub(crate) fn awaiting_second_hello(tls: &ServerConnection) -> bool {
    matches!(
        tls.handshake_kind(),
        Some(HandshakeKind::FullWithHelloRetryRequest)
    ) && tls.negotiated_key_exchange_group().is_none()
}

/// What the hello offers (visible to the fuzzing module, which checks it against rustls).
pub(crate) struct Hint {
    pub(crate) psk: bool,
    pub(crate) ticket: bool,
    pub(crate) session_id: Vec<u8>,
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

pub(crate) fn scan(flight: &[u8]) -> Option<Hint> {
    // Reassemble handshake bytes from as many whole records as the flight holds. The flight is
    // everything read so far, so it may end inside a later record (early data, or a read that
    // split one): that ends the reassembly, since the hello may be complete before it.
    let mut hs = Vec::new();
    let mut rd = Reader(flight);
    while !rd.0.is_empty() {
        let Some(header) = rd.take(5) else { break };
        let typ = header[0];
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let Some(body) = rd.take(len) else { break };
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
    let session_id = ch.take(sid_len)?.to_vec();
    let suites = usize::from(ch.u16()?);
    ch.take(suites)?;
    let comp = usize::from(ch.u8()?);
    ch.take(comp)?;
    let mut hint = Hint {
        psk: false,
        ticket: false,
        session_id,
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
            _ => {}
        }
    }
    Some(hint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ServerSessionMemoryCache;

    fn record(session_id: &[u8], exts: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(session_id.len() as u8);
        body.extend_from_slice(session_id);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![HS_CLIENT_HELLO, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![RECORD_HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    // supported_versions offering TLS 1.2 only, as a TLS 1.2-only rustls client sends it.
    const TLS12_ONLY: &[u8] = &[0, 43, 0, 3, 2, 3, 3];

    #[test]
    fn garbage_takes_the_safe_path() {
        let cache = ServerSessionMemoryCache::new(4);
        assert!(may_resume(b"GET / HTTP/1.1\r\n", &*cache));
        assert!(may_resume(&[], &*cache));
    }

    #[test]
    fn a_complete_hello_reads_even_when_a_later_record_is_cut_short() {
        let cache = ServerSessionMemoryCache::new(4);
        let sid = [7u8; 32];
        assert!(cache.put(sid.to_vec(), b"session".to_vec()));
        let mut flight = record(&sid, TLS12_ONLY);
        // The start of an application-data record: its body has not arrived yet.
        flight.extend_from_slice(&[23, 3, 3, 0, 40, 1, 2]);
        let hint = scan(&flight).expect("the hello itself is complete");
        assert_eq!(hint.session_id, sid);
        assert!(!may_resume(&record(&[1; 32], TLS12_ONLY), &*cache));
        let mut unknown = record(&[1; 32], TLS12_ONLY);
        unknown.push(23);
        assert!(
            !may_resume(&unknown, &*cache),
            "a full handshake, not the safe path"
        );
    }

    #[test]
    fn psk_or_ticket_may_resume() {
        let cache = ServerSessionMemoryCache::new(4);
        assert!(!may_resume(&record(&[], &[0, 43, 0, 0]), &*cache));
        assert!(may_resume(
            &record(&[], &[0, 43, 0, 0, 0, 41, 0, 0]),
            &*cache
        ));
        assert!(may_resume(&record(&[], &[0, 35, 0, 1, 7]), &*cache));
        // An empty ticket extension only says "I can take a ticket".
        assert!(!may_resume(&record(&[], &[0, 35, 0, 0]), &*cache));
    }

    #[test]
    fn session_id_counts_only_when_the_store_knows_it() {
        let cache = ServerSessionMemoryCache::new(4);
        let sid = [9u8; 32];
        // A TLS 1.3 client's random legacy session id: a full handshake.
        assert!(!may_resume(&record(&sid, &[0, 43, 0, 3, 2, 3, 4]), &*cache));
        assert!(!may_resume(&record(&sid, TLS12_ONLY), &*cache));
        assert!(cache.put(sid.to_vec(), b"session".to_vec()));
        assert!(may_resume(&record(&sid, TLS12_ONLY), &*cache));
        // Whatever versions are offered: the server may still pick TLS 1.2.
        assert!(may_resume(&record(&sid, &[0, 43, 0, 3, 2, 3, 4]), &*cache));
    }
}
