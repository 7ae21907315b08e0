//! The Prometheus endpoint: `GET /metrics` on its own address, never on a TLS listener.
//!
//! The data plane records through the `metrics` facade (names in `tlsgate_dataplane::metrics`);
//! this module installs the Prometheus recorder and serves its text rendering over plain HTTP
//! (hyper's HTTP/1.1 server, one request per connection).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read before the connection is dropped.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How often histograms are compacted.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Installs the process-wide recorder. Call once, before the data plane starts.
pub fn install() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(crate::mgmt_metrics::DURATION_BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the Prometheus recorder")?;
    crate::mgmt_metrics::describe();
    Ok(handle)
}

/// Binds the endpoint; returns the listener and its address (port 0 allowed).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("[metrics].listen: cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves scrapes until the runtime stops, holding at most `max_connections` connections (see
/// [`crate::conn_limit`]); each has [`REQUEST_TIMEOUT`] to send its request and get its answer.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, max_connections: usize) {
    let limiter = crate::conn_limit::ConnLimiter::new(max_connections);
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(mut slot) = limiter.admit() else {
                    tracing::debug!("metrics endpoint: every connection busy; new one closed");
                    continue;
                };
                let handle = handle.clone();
                let busy = slot.busy_handle();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = &mut slot.evicted => {}
                        _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &handle, &busy)) => {}
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "metrics endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection: one request (hyper's HTTP/1.1 server, keep-alive off), `GET /metrics`
/// answered with the text rendering, anything else 404.
async fn answer(
    stream: TcpStream,
    handle: &PrometheusHandle,
    busy: &crate::conn_limit::BusyHandle,
) -> Result<(), hyper::Error> {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Method, Request, Response, StatusCode};
    let svc = hyper::service::service_fn(|req: Request<Incoming>| {
        // A request in progress: no longer idle, so not the one evicted to make room.
        let _busy = busy.busy();
        let (status, body) = if req.method() == Method::GET && req.uri().path() == "/metrics" {
            (StatusCode::OK, handle.render())
        } else {
            (
                StatusCode::NOT_FOUND,
                "only GET /metrics is served here\n".to_owned(),
            )
        };
        let response = Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(body)));
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
