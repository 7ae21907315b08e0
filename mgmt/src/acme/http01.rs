//! The `http-01` listener (`[acme_http01]`): answers `GET /.well-known/acme-challenge/<token>`
//! with the key authorization of a pending challenge, and other requests with a redirect to
//! `https://` (`redirect_https = true`) or 404. Plain HTTP/1.1, one request per connection,
//! bounded like the metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use tokio::net::TcpListener;

use super::Challenges;

/// Connections held at most (a CA validates from a handful of vantage points).
const MAX_CONNECTIONS: usize = 64;

const PREFIX: &str = "/.well-known/acme-challenge/";

/// Binds the listener (port 0 allowed); returns it and its address.
/// Its port is in `Config::tcp_bind_ports` (the only ports Landlock lets the process bind); a
/// binary upgrade hands the bound listener to the new process instead of binding it again.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    crate::plain_http::bind(addr, "[acme_http01].listen").await
}

/// Serves until the runtime stops, bounded as every plain-HTTP listener is
/// ([`crate::plain_http`]).
pub async fn serve(listener: TcpListener, challenges: Arc<Challenges>, redirect_https: bool) {
    crate::plain_http::serve(
        listener,
        MAX_CONNECTIONS,
        "acme http-01 listener",
        move |req| {
            use http_body_util::Full;
            use hyper::body::Bytes;
            use hyper::Response;
            let host = req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok());
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let (status, location, body) =
                respond(&challenges, req.method(), host, pq, redirect_https);
            let mut r = Response::builder()
                .status(status)
                .header("content-type", "text/plain");
            if let Some(l) = location {
                r = r.header("location", l);
            }
            r.body(Full::new(Bytes::from(body)))
        },
    )
    .await
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
