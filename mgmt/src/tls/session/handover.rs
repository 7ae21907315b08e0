//! Ticket keys across a binary upgrade: the running process hands its local (random) ticket
//! keys, with the rotation schedule they belong to, to the process that replaces it, so tickets
//! issued before the upgrade resume after it. Fleet keys are not sent: the new process derives
//! them through the token like every appliance does.
//!
//! Wire format (inside the handover stream, `crate::upgrade`): `"TGTK" ‖ version 1 ‖ u32
//! listeners`, then per listener `u16 name length ‖ name ‖ u64 rotation ‖ u64 lifetime ‖ u16
//! keys ‖ keys × (u64 epoch ‖ 32 key bytes)`, all big-endian. The buffers are wiped on drop and
//! the bytes are never logged.

use std::sync::Arc;

use zeroize::Zeroizing;

const MAGIC: &[u8; 4] = b"TGTK";
const VERSION: u8 = 1;
/// Bounds what a peer can make us allocate: listeners and keys per listener.
const MAX_LISTENERS: u32 = 4096;
const MAX_KEYS: u16 = 1024;

/// One listener's local ticket keys and their schedule.
pub struct TicketKeys {
    listener: String,
    rotation: u64,
    lifetime: u64,
    keys: Vec<(u64, super::ticketer::RawKey)>,
}

impl TicketKeys {
    /// The listener these keys belong to.
    pub fn listener(&self) -> &str {
        &self.listener
    }
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("listener", &self.listener)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// The local ticket keys of `sessions`, encoded (wiped on drop).
pub(super) fn export(sessions: &[(String, Arc<super::ListenerSessions>)]) -> Zeroizing<Vec<u8>> {
    let mut entries = Vec::new();
    for (name, s) in sessions {
        if let Some(t) = &s.ticketer {
            let (rotation, lifetime, keys) = t.export_local_keys();
            if !keys.is_empty() {
                entries.push((name, rotation, lifetime, keys));
            }
        }
    }
    // Sized once: a growing Vec would leave unwiped copies of the keys in freed memory.
    let len = 9 + entries
        .iter()
        .map(|(name, _, _, keys)| 2 + name.len() + 16 + 2 + keys.len() * 40)
        .sum::<usize>();
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&u32::try_from(entries.len()).unwrap_or(0).to_be_bytes());
    for (name, rotation, lifetime, keys) in entries {
        // Listener names are short (checked at load); longer ones are cut, never wrapped.
        let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&name.as_bytes()[..usize::from(len).min(name.len())]);
        out.extend_from_slice(&rotation.to_be_bytes());
        out.extend_from_slice(&lifetime.to_be_bytes());
        let n = u16::try_from(keys.len()).unwrap_or(0).min(MAX_KEYS);
        out.extend_from_slice(&n.to_be_bytes());
        for (epoch, raw) in keys.iter().take(usize::from(n)) {
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(&raw[..]);
        }
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("ticket keys: the message is cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
}

/// Decodes what [`export`] made. Errors name positions, never bytes.
pub fn decode(buf: &[u8]) -> Result<Vec<TicketKeys>, String> {
    let mut r = Reader(buf);
    if r.take(4)? != MAGIC || r.take(1)? != [VERSION] {
        return Err("ticket keys: not a version 1 ticket-key message".into());
    }
    let count = r.u32()?;
    if count > MAX_LISTENERS {
        return Err(format!("ticket keys: {count} listeners is too many"));
    }
    let mut out = Vec::new();
    for _ in 0..count {
        let len = r.u16()?;
        let listener = String::from_utf8(r.take(usize::from(len))?.to_vec())
            .map_err(|_| "ticket keys: a listener name is not UTF-8".to_owned())?;
        let rotation = r.u64()?;
        let lifetime = r.u64()?;
        let n = r.u16()?;
        if n > MAX_KEYS {
            return Err(format!(
                "ticket keys: {n} keys for one listener is too many"
            ));
        }
        let mut keys = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let epoch = r.u64()?;
            let mut raw: super::ticketer::RawKey = Box::new(Zeroizing::new([0u8; 32]));
            raw.copy_from_slice(r.take(32)?);
            keys.push((epoch, raw));
        }
        out.push(TicketKeys {
            listener,
            rotation,
            lifetime,
            keys,
        });
    }
    if !r.0.is_empty() {
        return Err("ticket keys: bytes after the last listener".into());
    }
    Ok(out)
}

/// Hands `listener`'s inherited keys to its new ticketer.
pub(super) fn adopt(listener: &str, k: TicketKeys, ticketer: &super::EpochTicketer) {
    let taken = ticketer.import_local_keys(k.rotation, k.lifetime, &k.keys);
    if taken == 0 {
        tracing::info!(listener, "ticket keys of the previous process not taken (other rotation, lifetime or fleet tickets): its tickets do not resume here");
    } else {
        tracing::info!(
            listener,
            keys = taken,
            "ticket keys taken over from the previous process"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_what_is_cut_short_or_too_large_and_never_panics() {
        assert!(decode(b"").is_err());
        assert!(decode(b"TGTK\x01\xff\xff\xff\xff").is_err());
        let mut one = b"TGTK\x01\x00\x00\x00\x01\x00\x01a".to_vec();
        one.extend_from_slice(&60u64.to_be_bytes());
        one.extend_from_slice(&120u64.to_be_bytes());
        one.extend_from_slice(&1u16.to_be_bytes());
        one.extend_from_slice(&7u64.to_be_bytes());
        one.extend_from_slice(&[9u8; 32]);
        let got = decode(&one).expect("a well-formed message decodes");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].keys[0].0, 7);
        for cut in 0..one.len() {
            assert!(decode(&one[..cut]).is_err());
        }
        one.push(0);
        assert!(decode(&one).is_err());
    }

    #[test]
    fn keys_handed_over_decrypt_the_old_tickets() {
        let old = super::super::EpochTicketer::local("l", 60, 120);
        old.maintain_at(600).expect("local keys");
        let p = super::super::PolicyDigest::no_client_auth();
        let ticket = old.encrypt_at(600, &p, b"state").expect("a ticket");
        let (rotation, lifetime, keys) = old.export_local_keys();
        let new = super::super::EpochTicketer::local("l", 60, 120);
        assert_eq!(new.import_local_keys(rotation, lifetime, &keys), keys.len());
        new.maintain_at(601).expect("local keys");
        assert_eq!(
            new.decrypt_at(601, &p, &ticket).as_deref(),
            Some(&b"state"[..])
        );
        let other = super::super::EpochTicketer::local("l", 30, 120);
        assert_eq!(other.import_local_keys(rotation, lifetime, &keys), 0);
    }
}
