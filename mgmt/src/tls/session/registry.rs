//! One appliance's session state by listener: what its snapshot builds share so tickets and
//! cached sessions survive reloads, and the ticket keys inherited in a binary upgrade until each
//! listener's ticketer takes them. Owned by the running appliance ([`crate::appliance`]), not the
//! process: two appliances in one process (tests) share nothing.

use std::collections::HashMap;
use std::sync::Arc;

// parking_lot locks do not poison: each critical section here leaves its map consistent.
use parking_lot::Mutex;
use tlsgate_keystore::token::Token;
use zeroize::Zeroizing;

use super::handover::{self, TicketKeys};
use super::{ListenerSessions, SessionConfig, SessionError};

/// Session state by listener name, for the life of one appliance.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<ListenerSessions>>>,
    /// Keys received from the process this one replaced, until the listener's ticketer is made.
    inherited: Mutex<HashMap<String, TicketKeys>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The state for `listener` with these settings: the one this appliance already made when
    /// the settings (and token) are the same, else a new one (which takes the listener's
    /// inherited ticket keys, if any).
    pub fn for_listener(
        &self,
        listener: &str,
        config: &SessionConfig,
        token: Option<&Arc<Token>>,
    ) -> Result<Arc<ListenerSessions>, SessionError> {
        if let Some(s) = self.sessions.lock().get(listener) {
            if s.config == *config && s.same_token(token) {
                return Ok(s.clone());
            }
        }
        let inherited = self.inherited.lock().remove(listener);
        // Built outside the lock: a fleet ticketer talks to the token.
        let made = Arc::new(ListenerSessions::build(listener, config, token, inherited)?);
        self.sessions
            .lock()
            .insert(listener.to_owned(), made.clone());
        Ok(made)
    }

    /// The state of `listener`, if one was made (for the management plane).
    pub fn find(&self, listener: &str) -> Option<Arc<ListenerSessions>> {
        self.sessions.lock().get(listener).cloned()
    }

    /// Keeps the keys received from the previous process until each listener's ticketer is
    /// made (the first snapshot build).
    pub fn inherit(&self, keys: Vec<TicketKeys>) {
        let mut held = self.inherited.lock();
        for k in keys {
            held.insert(k.listener().to_owned(), k);
        }
    }

    /// Every listener's local ticket keys, encoded for the process that replaces this one
    /// (wiped on drop).
    pub fn export(&self) -> Zeroizing<Vec<u8>> {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .iter()
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect();
        handover::export(&sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::session::PolicyDigest;

    fn ticket_round_trip(from: &ListenerSessions, to: &ListenerSessions) -> bool {
        let (Some(a), Some(b)) = (&from.ticketer, &to.ticketer) else {
            panic!("tickets are on by default");
        };
        let now = super::super::now_secs();
        let policy = PolicyDigest::no_client_auth();
        let ticket = a
            .encrypt_at(now, &policy, b"a session")
            .expect("a ticket is issued");
        b.decrypt_at(now, &policy, &ticket).as_deref() == Some(&b"a session"[..])
    }

    #[test]
    fn two_appliances_share_no_session_state_and_keys_pass_only_by_handover() {
        let cfg = SessionConfig::default();
        let (one, two) = (Registry::new(), Registry::new());
        let a = one.for_listener("web", &cfg, None).expect("state");
        // The same appliance finds the same state again (a reload keeps tickets valid) ...
        let again = one.for_listener("web", &cfg, None).expect("state");
        assert!(Arc::ptr_eq(&a, &again));
        assert!(one.find("web").is_some_and(|s| Arc::ptr_eq(&s, &a)));
        // ... another appliance in the same process has its own: nothing of one is found in
        // the other, and a ticket of one does not resume on the other.
        assert!(two.find("web").is_none());
        let b = two.for_listener("web", &cfg, None).expect("state");
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(ticket_round_trip(&a, &a));
        assert!(!ticket_round_trip(&a, &b));
        // The keys one exports (a binary upgrade) are taken by the registry they are given to,
        // and by no other.
        let (three, four) = (Registry::new(), Registry::new());
        three.inherit(handover::decode(&one.export()).expect("decodes"));
        let c = three.for_listener("web", &cfg, None).expect("state");
        let d = four.for_listener("web", &cfg, None).expect("state");
        assert!(ticket_round_trip(&a, &c));
        assert!(!ticket_round_trip(&a, &d));
    }
}
