//! The Prometheus endpoint: `GET /metrics` on its own address, never on a TLS listener.
//!
//! The data plane records through the `metrics` facade (names in `tlsgate_dataplane::metrics`);
//! this module installs the Prometheus recorder and serves its text rendering over plain HTTP
//! (hyper's HTTP/1.1 server, one request per connection; bounded in [`crate::plain_http`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// How often histograms are compacted.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

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
    crate::plain_http::bind(addr, "[metrics].listen").await
}

/// Serves scrapes until the runtime stops, bounded as every plain-HTTP listener is
/// ([`crate::plain_http`]): at most `max_connections` connections, one request each.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, max_connections: usize) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    crate::plain_http::serve(listener, max_connections, "metrics endpoint", move |req| {
        use http_body_util::Full;
        use hyper::body::Bytes;
        use hyper::{Method, Response, StatusCode};
        // `GET /metrics` answered with the text rendering, anything else 404.
        let (status, body) = if req.method() == Method::GET && req.uri().path() == "/metrics" {
            (StatusCode::OK, handle.render())
        } else {
            (
                StatusCode::NOT_FOUND,
                "only GET /metrics is served here\n".to_owned(),
            )
        };
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(body)))
    })
    .await
}
