//! `tlsgate demo-backend`: the plain-HTTP backend the lab puts behind the appliance.
//!
//! It answers every HTTP/1.1 request with a short text page naming the request line, so a
//! `curl` through the appliance shows that TLS was terminated and the bytes reached a backend.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Args;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::http_head::{read_head, Head};

/// Largest request head the demo backend reads before it answers 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;

#[derive(Debug, Args)]
pub struct DemoBackendArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Write the bound address to this file once listening (for scripts that use port 0).
    #[arg(long)]
    pub ready_file: Option<std::path::PathBuf>,
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
        if let Some(path) = &args.ready_file {
            crate::files::write_atomic(path, local.to_string().as_bytes(), 0o644)?;
        }
        tracing::info!(%local, "demo backend listening");
        loop {
            let (stream, peer) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(err) = serve(stream).await {
                    tracing::debug!(%peer, error = %err, "demo backend connection ended");
                }
            });
        }
    })
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let head_end = match read_head(&mut stream, &mut buf, MAX_HEAD_BYTES).await? {
            Head::Complete(end) => end,
            Head::Closed => return Ok(()),
            Head::TooLarge => {
                stream
                    .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await?;
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let request_line = head.lines().next().unwrap_or_default().to_owned();
        let close = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close"));
        let body = format!("hello from the tlsgate demo backend\nrequest: {request_line}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
            body
        );
        stream.write_all(response.as_bytes()).await?;
        // Requests with bodies are not part of the demo: what follows the head is taken as the
        // next request (pipelining).
        buf.drain(..head_end);
        if close {
            return stream.shutdown().await;
        }
    }
}
