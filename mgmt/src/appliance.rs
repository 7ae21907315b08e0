//! What one running appliance keeps for its whole life, beyond any one snapshot: its session
//! state by listener (ticket keys, caches, the keys inherited in a binary upgrade) and its
//! backend servers' states and published pools. `tlsgate serve` makes one and hands it to the
//! snapshot builder, the management API, the signal loop and the upgrade handover; nothing of
//! it is process-wide, so two appliances in one process (tests) share nothing.
//!
//! The statics that remain are process-wide by nature (listed in `ARCHITECTURE.md`).

use std::sync::Arc;

/// One running appliance's state.
#[derive(Debug, Default)]
pub struct Appliance {
    /// Session state by listener, kept across reloads.
    pub sessions: crate::tls::session::Registry,
    /// Backend servers' states (kept across reloads) and the published pools.
    pub pools: Arc<crate::pools::Pools>,
}

impl Appliance {
    pub fn new() -> Arc<Appliance> {
        Arc::new(Appliance::default())
    }
}
