//! The plain-HTTP listeners the appliance serves beside its TLS listeners (the Prometheus
//! endpoint, the ACME `http-01` listener): one place for how they are bounded. hyper's
//! HTTP/1.1 server, one request per connection (keep-alive off), a request head of at most
//! [`MAX_HEAD_BYTES`], [`REQUEST_TIMEOUT`] to send the request and get the answer, and at most
//! `max_connections` connections held (see [`crate::conn_limit`]: a new one evicts the oldest
//! idle one, and is closed when every held one is busy).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read before the connection is dropped.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request and get its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` (port 0 allowed); returns the listener and its address. `what` names the
/// configuration key in the error (`[metrics].listen`).
pub async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves until the runtime stops, answering every request with `respond` (an error from it, a
/// response that cannot be built, ends the connection). `what` names the listener in log lines.
pub async fn serve<F>(listener: TcpListener, max_connections: usize, what: &'static str, respond: F)
where
    F: Fn(&Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::http::Error>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let limiter = crate::conn_limit::ConnLimiter::new(max_connections);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(mut slot) = limiter.admit() else {
                    tracing::debug!(listener = what, "every connection busy; new one closed");
                    continue;
                };
                let respond = respond.clone();
                let busy = slot.busy_handle();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = &mut slot.evicted => {}
                        _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &respond, &busy)) => {}
                    }
                });
            }
            Err(err) => {
                tracing::warn!(listener = what, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection, one request.
async fn answer<F>(
    stream: TcpStream,
    respond: &F,
    busy: &crate::conn_limit::BusyHandle,
) -> Result<(), hyper::Error>
where
    F: Fn(&Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::http::Error>,
{
    let svc = hyper::service::service_fn(|req: Request<Incoming>| {
        // A request in progress: no longer idle, so not the one evicted to make room.
        let _busy = busy.busy();
        let response = respond(&req);
        async move { response }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await
}
