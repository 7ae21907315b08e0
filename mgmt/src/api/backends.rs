//! `/v1/backends`: the pools of the published snapshot, their servers' state, and the
//! operator's `ready` / `drain` / `maint` per server. The state lives in the data plane's shared
//! server state (a reload keeps it for a server that stays); it is not written to the state
//! directory, so a restart starts every server `ready`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use tlsgate_dataplane::pool::{AdminState, Balance, Pool};

use super::error::ApiError;
use super::manager::Manager;
use super::routes::{body, run};
use super::wire::{
    self, BalanceKind, Health, PoolList, PoolView, ServerState, ServerView, SetState,
};
use crate::audit::ClientIdentity;

/// Every pool and server, as `tlsgate ctl backends list` prints them.
pub fn list(pools: &[Arc<Pool>]) -> PoolList {
    let now = tlsgate_dataplane::pool::health::now_ms();
    let items = pools
        .iter()
        .map(|p| PoolView {
            name: p.name.clone(),
            balance: match p.balance {
                Balance::RoundRobin => BalanceKind::RoundRobin,
                Balance::LeastConnections => BalanceKind::LeastConnections,
                Balance::ConsistentHash => BalanceKind::ConsistentHash,
            },
            alpn: p
                .alpn
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
            health_check: p.health_check.is_some(),
            servers: p
                .servers
                .iter()
                .map(|s| {
                    let st = &s.state;
                    ServerView {
                        address: s.addr.to_string(),
                        weight: s.weight,
                        max_connections: s.max_connections,
                        state: wire_state(st.admin()),
                        health: if !st.is_up() {
                            Health::Down
                        } else if st.ejected(now) {
                            Health::Ejected
                        } else {
                            Health::Up
                        },
                        active: st.active.load(Relaxed),
                        total: st.total.load(Relaxed),
                        connect_errors: st.connect_refused.load(Relaxed)
                            + st.connect_timeouts.load(Relaxed),
                    }
                })
                .collect(),
        })
        .collect();
    PoolList { items }
}

fn wire_state(s: AdminState) -> wire::AdminState {
    match s {
        AdminState::Ready => wire::AdminState::Ready,
        AdminState::Drain => wire::AdminState::Drain,
        AdminState::Maint => wire::AdminState::Maint,
    }
}

fn plane_state(s: wire::AdminState) -> AdminState {
    match s {
        wire::AdminState::Ready => AdminState::Ready,
        wire::AdminState::Drain => AdminState::Drain,
        wire::AdminState::Maint => AdminState::Maint,
    }
}

/// Sets a server's state; `None` when the pool or the server is not published.
pub fn set_state(pools: &[Arc<Pool>], pool: &str, server: &str, state: AdminState) -> Option<()> {
    let p = pools.iter().find(|p| p.name == pool)?;
    let s = p.servers.iter().find(|s| s.addr.to_string() == server)?;
    s.state.set_admin(state);
    Some(())
}

pub(super) async fn get(
    State(m): State<Arc<Manager>>,
    Extension(who): Extension<ClientIdentity>,
) -> Result<Response, ApiError> {
    let v = run(m, who, "backend.list", "*".into(), |m| {
        Ok(list(&m.appliance().pools.view()))
    })
    .await?;
    Ok(Json(v).into_response())
}

pub(super) async fn put_state(
    State(m): State<Arc<Manager>>,
    Extension(who): Extension<ClientIdentity>,
    Path((pool, server)): Path<(String, String)>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let req: Result<SetState, _> = body(&b);
    let target = format!("{pool}/{server}");
    let v = run(m, who, "backend.set_state", target, move |m| {
        let state = plane_state(req?.state);
        set_state(&m.appliance().pools.view(), &pool, &server, state).ok_or_else(|| {
            ApiError::not_found(
                "backend_not_found",
                format!("no server {server} in a published pool {pool:?}; see GET /v1/backends"),
            )
        })?;
        Ok(ServerState {
            pool,
            server,
            state: wire_state(state),
        })
    })
    .await?;
    Ok(Json(v).into_response())
}
