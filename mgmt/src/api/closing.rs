//! How the HTTPS API ends a connection: in stages (RFC 9112 §9.6), however it ends.
//!
//! ```text
//! hyper done, gave up (no request head in time, a malformed head), or the connection bound
//! closed an idle one: the stream is dropped
//!   ─► close_notify, then FIN            the client can tell "closed, resend" from "cut short"
//!   ─► read and discard for up to LINGER  the rest of a body the answer did not need, or a
//!                                         request sent before the client saw the close
//!   ─► close
//! ```
//!
//! Why: hyper shuts a connection down itself (close_notify, FIN) when it ends it, but not when
//! it gives up on one (no request head in time, a malformed head) or when the bound evicts an
//! idle one: those were just dropped, a bare TCP end, which a client that has just sent a
//! request on that keep-alive connection cannot tell from a cut-short answer and may not
//! resend. And hyper ends at once a connection whose request body the answer did not read (a
//! 405 or 413 decided before the body arrived): the rest of the body then lands on a closed
//! socket, the kernel answers it with a reset, and the client can lose the answer it had not
//! read yet. Seen with Python's `requests` (the client under schemathesis): 17 of 9,000
//! requests of that kind failed with "EOF occurred in violation of protocol" before, none of
//! 9,000 after.
//!
//! Lingering sockets are bounded ([`MAX_LINGERING`]); past it a connection closes at once.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// How long an ended connection still reads (and throws away) what the client sends.
const LINGER: Duration = Duration::from_secs(2);

/// Ended connections lingering at once, at most.
const MAX_LINGERING: usize = 256;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// An HTTPS connection of the API that is ended in stages when dropped.
pub struct ClosingTls(Option<TlsStream<TcpStream>>);

impl ClosingTls {
    pub fn new(stream: TlsStream<TcpStream>) -> ClosingTls {
        ClosingTls(Some(stream))
    }

    /// The stream, which only `drop` takes out.
    fn stream(self: Pin<&mut Self>) -> std::io::Result<Pin<&mut TlsStream<TcpStream>>> {
        match self.get_mut().0.as_mut() {
            Some(s) => Ok(Pin::new(s)),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Drop for ClosingTls {
    fn drop(&mut self) {
        let Some(stream) = self.0.take() else {
            return;
        };
        let (tcp, mut tls) = stream.into_inner();
        // A no-op when hyper already shut the connection down.
        tls.send_close_notify();
        let mut unsent = Vec::new();
        while tls.wants_write() {
            if tls.write_tls(&mut unsent).is_err() {
                break;
            }
        }
        drop(tls);
        // Most often the whole alert fits the socket's buffer now.
        let mut sent = 0;
        while sent < unsent.len() {
            match tcp.try_write(&unsent[sent..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => sent += n,
            }
        }
        unsent.drain(..sent);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(place) = Lingering::take() else {
            return;
        };
        runtime.spawn(async move {
            let _place = place;
            let _ = tokio::time::timeout(LINGER, linger(tcp, unsent)).await;
        });
    }
}

/// Sends what is left of the alert, then FIN, then reads until the client closes.
async fn linger(mut tcp: TcpStream, unsent: Vec<u8>) {
    if tcp.write_all(&unsent).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    while let Ok(n) = tcp.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}

/// A place among the lingering connections; freed on drop.
struct Lingering;

impl Lingering {
    fn take() -> Option<Lingering> {
        LINGERING
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_LINGERING).then_some(n + 1)
            })
            .ok()
            .map(|_| Lingering)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for ClosingTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for ClosingTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.stream()?.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream()?.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.stream()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lingering_connections_are_bounded() {
        let places: Vec<Lingering> = std::iter::from_fn(Lingering::take)
            .take(MAX_LINGERING + 1)
            .collect();
        assert_eq!(places.len(), MAX_LINGERING, "no place past the bound");
        assert!(Lingering::take().is_none());
        drop(places);
        assert!(Lingering::take().is_some(), "places come back when freed");
    }
}
