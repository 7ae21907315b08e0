//! `tlsgate demo-backend`: the plain-HTTP backend the lab puts behind the appliance.
//!
//! It answers every request with a short text page naming itself (`--name`, also in the
//! `x-backend` response header) and the request line, so a `curl` through the appliance shows
//! that TLS was terminated, which backend answered and in which protocol. It speaks HTTP/1.1
//! and HTTP/2 with prior knowledge (h2c: what tlsgate forwards after negotiating `h2` with the
//! client), on hyper.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[derive(Debug, Args)]
pub struct DemoBackendArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Write the bound address to this file once listening (for scripts that use port 0).
    #[arg(long)]
    pub ready_file: Option<std::path::PathBuf>,
    /// The name this backend reports (header `x-backend` and the page); default: its address.
    #[arg(long)]
    pub name: Option<String>,
}

/// Serves until killed.
pub fn run(args: DemoBackendArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let local = listener.local_addr()?;
        let name: Arc<str> = args.name.unwrap_or_else(|| local.to_string()).into();
        if let Some(path) = &args.ready_file {
            crate::files::write_atomic(path, local.to_string().as_bytes(), 0o644)?;
        }
        tracing::info!(%local, %name, "demo backend listening");
        loop {
            let (stream, peer) = listener.accept().await?;
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(name.clone(), req));
                let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                if let Err(err) = served {
                    tracing::debug!(%peer, error = %err, "demo backend connection ended");
                }
            });
        }
    })
}

async fn answer(
    name: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let body = format!(
        "hello from the tlsgate demo backend {name}\nrequest: {} {target} {:?}\n",
        req.method(),
        req.version()
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&name) {
        headers.insert("x-backend", v);
    }
    Ok(response)
}
