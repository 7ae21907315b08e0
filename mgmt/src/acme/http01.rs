//! The `http-01` listener (`[acme_http01]`): answers `GET /.well-known/acme-challenge/<token>`
//! with the key authorization of a pending challenge, and other requests with a redirect to
//! `https://` (`redirect_https = true`) or 404. Plain HTTP/1.1, one request per connection,
//! bounded like the metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};

use super::Challenges;

/// Largest request head read before the connection is dropped.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request and get its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held at most (a CA validates from a handful of vantage points).
const MAX_CONNECTIONS: usize = 64;

const PREFIX: &str = "/.well-known/acme-challenge/";

/// Binds the listener (port 0 allowed); returns it and its address.
/// Its port is in `Config::tcp_bind_ports` (the only ports Landlock lets the process bind); a
/// binary upgrade hands the bound listener to the new process instead of binding it again.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("[acme_http01].listen: cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves until the runtime stops.
pub async fn serve(listener: TcpListener, challenges: Arc<Challenges>, redirect_https: bool) {
    let limiter = crate::conn_limit::ConnLimiter::new(MAX_CONNECTIONS);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(mut slot) = limiter.admit() else {
                    continue;
                };
                let challenges = challenges.clone();
                let busy = slot.busy_handle();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = &mut slot.evicted => {}
                        _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &challenges, redirect_https, &busy)) => {}
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "acme http-01 listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What to answer a request with: status, `location`, body.
pub fn respond(
    challenges: &Challenges,
    method: &hyper::Method,
    host: Option<&str>,
    path_and_query: &str,
    redirect_https: bool,
) -> (hyper::StatusCode, Option<String>, String) {
    use hyper::StatusCode;
    let path = path_and_query.split('?').next().unwrap_or("");
    if let Some(token) = path.strip_prefix(PREFIX) {
        if method == hyper::Method::GET {
            if let Some(ka) = challenges.http01(token) {
                return (StatusCode::OK, None, ka);
            }
        }
        return (StatusCode::NOT_FOUND, None, "no such challenge\n".into());
    }
    // The host must be a plain name (no CR/LF, no path): it goes into a header.
    let host = host.filter(|h| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    });
    match (redirect_https, host) {
        (true, Some(h)) => {
            let name = match h.rsplit_once(':') {
                Some((n, p)) if !n.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => h,
            };
            let location = format!("https://{name}{path_and_query}");
            (StatusCode::MOVED_PERMANENTLY, Some(location), String::new())
        }
        _ => (StatusCode::NOT_FOUND, None, "not found\n".into()),
    }
}

async fn answer(
    stream: TcpStream,
    challenges: &Challenges,
    redirect_https: bool,
    busy: &crate::conn_limit::BusyHandle,
) -> Result<(), hyper::Error> {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};
    let svc = hyper::service::service_fn(|req: Request<Incoming>| {
        let _busy = busy.busy();
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok());
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let (status, location, body) = respond(challenges, req.method(), host, &pq, redirect_https);
        let mut r = Response::builder()
            .status(status)
            .header("content-type", "text/plain");
        if let Some(l) = location {
            r = r.header("location", l);
        }
        let response = r.body(Full::new(Bytes::from(body)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::{Method, StatusCode};

    #[test]
    fn answers_challenges_and_redirects() {
        let c = Challenges::new();
        c.add_http01("tok", "tok.thumb");
        let (s, _, b) = respond(
            &c,
            &Method::GET,
            Some("a.test"),
            "/.well-known/acme-challenge/tok",
            true,
        );
        assert_eq!((s, b.as_str()), (StatusCode::OK, "tok.thumb"));
        let (s, _, _) = respond(
            &c,
            &Method::GET,
            Some("a.test"),
            "/.well-known/acme-challenge/other",
            true,
        );
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, l, _) = respond(&c, &Method::GET, Some("a.test:80"), "/x?y=1", true);
        assert_eq!(
            (s, l.as_deref()),
            (StatusCode::MOVED_PERMANENTLY, Some("https://a.test/x?y=1"))
        );
        let (s, _, _) = respond(&c, &Method::GET, Some("a.test\r\nX: y"), "/x", true);
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, l, _) = respond(&c, &Method::GET, Some("a.test"), "/x", false);
        assert_eq!((s, l), (StatusCode::NOT_FOUND, None));
        c.remove_http01("tok");
        let (s, _, _) = respond(
            &c,
            &Method::GET,
            Some("a.test"),
            "/.well-known/acme-challenge/tok",
            true,
        );
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
}
