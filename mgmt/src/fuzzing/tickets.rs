//! Session-ticket decryption (`session::ticketer::EpochTicketer`): random bytes, bit-flipped
//! tickets and tickets presented at another time.

use crate::tls::session::policy::PolicyDigest;
use crate::tls::session::EpochTicketer;
use crate::tls::session::MAX_CLOCK_SKEW_SECS;

const ROTATION: u64 = 3600;
const LIFETIME: u64 = 7200;
/// The fuzzing clock.
const T0: u64 = super::NOW_UNIX;
/// A TLS 1.3 server session as rustls encodes it (no SNI, then the version 0x0304).
const TLS13_STATE: &[u8] = b"\x00\x03\x04 a TLS 1.3 session state";
/// A TLS 1.2 one: its re-issued tickets keep the first issue time.
const TLS12_STATE: &[u8] = b"\x01\x0cfuzz.example\x03\x03 a TLS 1.2 session state";

fn issued_at(ticket: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&ticket[9..17]);
    u64::from_be_bytes(b)
}

/// Mode byte 0: the rest is a ticket: it never decrypts (nobody can forge one). 1: the rest
/// picks bits to flip in a fresh ticket: a changed ticket never decrypts. 2: a fresh ticket
/// presented at T0 + the rest (signed seconds): it decrypts exactly when it is within its
/// lifetime and not from the future. 3: a TLS 1.2 ticket decrypted then re-issued later keeps
/// its first issue time, and dies with it.
pub fn ticket_decrypt(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    // Tickets are made and presented under one client-auth policy; another one never opens them.
    let p = &PolicyDigest::no_client_auth();
    let t = EpochTicketer::local("fuzz", ROTATION, LIFETIME);
    t.maintain_at(T0).expect("local keys are random bytes");
    let ticket = t
        .encrypt_at(T0, p, TLS13_STATE)
        .expect("the current key is held");
    assert_eq!(t.decrypt_at(T0, p, &ticket).as_deref(), Some(TLS13_STATE));
    let other = PolicyDigest::client_auth(crate::tls::client_auth::ClientAuthMode::Required, &[]);
    assert_eq!(
        t.decrypt_at(T0, &other, &ticket),
        None,
        "another policy opened a ticket"
    );
    match mode % 4 {
        0 => {
            assert_eq!(t.decrypt_at(T0, p, rest), None, "a forged ticket decrypted");
            assert_eq!(t.decrypt_at(T0 + ROTATION, p, rest), None);
        }
        1 => {
            let mut damaged = ticket.clone();
            for pair in rest.chunks(2) {
                let bit = usize::from(u16::from_le_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
                let bit = bit % (damaged.len() * 8);
                damaged[bit / 8] ^= 1 << (bit % 8);
            }
            let got = t.decrypt_at(T0, p, &damaged);
            if damaged == ticket {
                assert_eq!(got.as_deref(), Some(TLS13_STATE));
            } else {
                assert_eq!(got, None, "a damaged ticket decrypted");
            }
            // Cut or extended tickets are damaged too.
            let cut = rest.len() % ticket.len();
            assert_eq!(t.decrypt_at(T0, p, &ticket[..cut]), None);
            let mut longer = ticket.clone();
            longer.extend_from_slice(rest);
            if !rest.is_empty() {
                assert_eq!(t.decrypt_at(T0, p, &longer), None);
            }
        }
        2 => {
            let mut b = [0u8; 8];
            for (d, s) in b.iter_mut().zip(rest) {
                *d = *s;
            }
            let delta = i64::from_le_bytes(b) % (10 * LIFETIME as i64);
            let at = T0.saturating_add_signed(delta);
            let ok = at + MAX_CLOCK_SKEW_SECS >= T0 && at.saturating_sub(T0) <= LIFETIME;
            let got = t.decrypt_at(at, p, &ticket);
            assert_eq!(got.is_some(), ok, "ticket of {T0} presented at {at}");
        }
        _ => {
            let first = t.encrypt_at(T0, p, TLS12_STATE).expect("held key");
            let later = T0 + u64::from(rest.first().copied().unwrap_or(0)) * 30;
            if t.maintain_at(later).is_err() {
                return;
            }
            let Some(plain) = t.decrypt_at(later, p, &first) else {
                // Only too old (or its key erased) may refuse it.
                assert!(later - T0 > LIFETIME, "refused within its lifetime");
                return;
            };
            assert_eq!(plain, TLS12_STATE);
            let again = t
                .encrypt_at(later, p, &plain)
                .expect("the current key is held");
            assert_eq!(
                issued_at(&again),
                T0,
                "a re-issued TLS 1.2 ticket keeps its issue time"
            );
            let dead = T0 + LIFETIME + 1;
            if t.maintain_at(dead).is_ok() {
                assert_eq!(
                    t.decrypt_at(dead, p, &again),
                    None,
                    "it dies with the first"
                );
            }
        }
    }
}
