//! Reading an HTTP/1.1 request head, for the demo backend (the metrics endpoint is served by
//! hyper, see `metrics_http`).

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// What [`read_head`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// `buf[..len]` is a complete head, blank line included; bytes after it are the next request.
    Complete(usize),
    /// The peer closed before a complete head arrived.
    Closed,
    /// More than the allowed bytes arrived without completing a head.
    TooLarge,
}

/// Reads from `stream` into `buf` (which may already hold bytes) until it holds a complete
/// request head, at most `max` bytes of it.
pub async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Head> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Head::Complete(end + 4));
        }
        if buf.len() > max {
            return Ok(Head::TooLarge);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
