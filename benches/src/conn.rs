//! One TLS connection over a blocking socket: connect, handshake, HTTP/1.1 exchange, close.
//!
//! Every failure is mapped to an [`ErrorKind`] so the report can count errors by kind instead of
//! stopping the run.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind};

/// Upper bound on a response head; anything longer is not the benchmark's server.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Read granularity; large enough that bulk bodies cost few syscalls.
const READ_CHUNK: usize = 64 * 1024;

/// Why a connection or request failed; the names are the report's error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// TCP connect refused or failed.
    Connect,
    /// A socket timeout expired.
    Timeout,
    /// The TLS layer failed (alert, bad certificate, protocol error).
    Tls,
    /// The peer closed or reset the connection before the exchange finished.
    Closed,
    /// Another socket error.
    Io,
    /// Resume mode: the server did a full handshake.
    NotResumed,
    /// Full mode: the handshake was not a full one.
    NotFull,
    /// The response was not `HTTP/1.x 200` or its head was malformed.
    Http,
    /// The body was shorter or longer than expected.
    BodySize,
    /// Resume mode: the slot's first (priming) connection failed.
    Primer,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Tls => "tls",
            ErrorKind::Closed => "closed",
            ErrorKind::Io => "io",
            ErrorKind::NotResumed => "not_resumed",
            ErrorKind::NotFull => "not_full",
            ErrorKind::Http => "http",
            ErrorKind::BodySize => "body_size",
            ErrorKind::Primer => "primer",
        }
    }

    fn of_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ErrorKind::Timeout,
            // rustls reports its own errors through `InvalidData`.
            io::ErrorKind::InvalidData => ErrorKind::Tls,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrorKind::Closed,
            _ => ErrorKind::Io,
        }
    }
}

/// A failed connection or request: the kind it is counted under, and what happened (kept for
/// the first failure of each kind, so a report can say why without logging every one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, detail: String) -> Self {
        Failure { kind, detail }
    }

    fn io(e: &io::Error) -> Self {
        Failure::new(ErrorKind::of_io(e), e.to_string())
    }
}

impl From<ErrorKind> for Failure {
    fn from(kind: ErrorKind) -> Self {
        Failure::new(kind, String::new())
    }
}

/// What the run needs to know about every connection.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub timeout: Duration,
}

/// A live TLS connection.
#[derive(Debug)]
pub struct Tls {
    pub conn: ClientConnection,
    pub sock: TcpStream,
}

/// The parts of a response the report uses.
#[derive(Debug, Clone, Copy)]
pub struct Response {
    pub body_bytes: u64,
    /// The server will keep the connection open for another request.
    pub keep_alive: bool,
    /// The server closed TCP without a TLS close_notify (tolerated, counted).
    pub unclean_close: bool,
}

/// Connects and completes the handshake.
pub fn open(ep: &Endpoint, config: &Arc<ClientConfig>) -> Result<Tls, Failure> {
    let sock = TcpStream::connect_timeout(&ep.addr, ep.timeout).map_err(|e| {
        let kind = match ErrorKind::of_io(&e) {
            ErrorKind::Timeout => ErrorKind::Timeout,
            _ => ErrorKind::Connect,
        };
        Failure::new(kind, e.to_string())
    })?;
    let setup = sock
        .set_nodelay(true)
        .and_then(|()| sock.set_read_timeout(Some(ep.timeout)))
        .and_then(|()| sock.set_write_timeout(Some(ep.timeout)));
    setup.map_err(|e| Failure::io(&e))?;
    let conn = ClientConnection::new(config.clone(), ep.server_name.clone())
        .map_err(|e| Failure::new(ErrorKind::Tls, e.to_string()))?;
    let mut tls = Tls { conn, sock };
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| Failure::io(&e))?;
    }
    Ok(tls)
}

impl Tls {
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// Sends `request` and reads one response. `expect_body` checks the body size.
    pub fn exchange(
        &mut self,
        request: &[u8],
        expect_body: Option<u64>,
        scratch: &mut Vec<u8>,
    ) -> Result<Response, Failure> {
        let mut stream = rustls::Stream::new(&mut self.conn, &mut self.sock);
        stream
            .write_all(request)
            .and_then(|()| stream.flush())
            .map_err(|e| Failure::io(&e))?;
        read_response(&mut stream, expect_body, scratch)
    }

    /// Reads until the server ends the connection (close_notify or TCP EOF); anything else it
    /// sends is an HTTP error (the exchange is over).
    pub fn wait_server_close(&mut self) -> Result<(), Failure> {
        let mut stream = rustls::Stream::new(&mut self.conn, &mut self.sock);
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(ErrorKind::Http.into()),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::io(&e)),
            }
        }
    }

    /// Sends close_notify; the server may already be gone, which is fine for a benchmark.
    pub fn close(mut self) {
        self.conn.send_close_notify();
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.sock).is_err() {
                break;
            }
        }
    }
}

/// Builds the request bytes once per run.
pub fn build_request(
    host: &str,
    path: &str,
    keep_alive: bool,
    min_bytes: Option<usize>,
) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tlsgate-load\r\nConnection: {connection}\r\n"
    );
    if let Some(min) = min_bytes {
        const PAD_NAME: &str = "X-Pad: ";
        // The head so far, plus the blank line that ends it.
        let unpadded = head.len() + 2;
        if min > unpadded {
            let fill = min.saturating_sub(unpadded + PAD_NAME.len() + 2);
            head.push_str(PAD_NAME);
            head.extend(std::iter::repeat_n('a', fill));
            head.push_str("\r\n");
        }
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn read_response(
    stream: &mut impl Read,
    expect_body: Option<u64>,
    scratch: &mut Vec<u8>,
) -> Result<Response, Failure> {
    scratch.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = find_head_end(scratch) {
            break pos;
        }
        if scratch.len() > MAX_HEAD_BYTES {
            return Err(ErrorKind::Http.into());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(ErrorKind::Closed.into()),
            Ok(n) => scratch.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(Failure::io(&e)),
        }
    };
    let head =
        std::str::from_utf8(&scratch[..head_end]).map_err(|_| Failure::from(ErrorKind::Http))?;
    let info = parse_head(head)?;
    let mut body = (scratch.len() - head_end - 4) as u64;
    let mut unclean_close = false;
    let mut buf = vec![0u8; READ_CHUNK];
    match info.content_length {
        Some(len) => {
            while body < len {
                match stream.read(&mut buf) {
                    Ok(0) => return Err(ErrorKind::BodySize.into()),
                    Ok(n) => body += n as u64,
                    Err(e) => return Err(Failure::io(&e)),
                }
            }
            if body > len {
                // No pipelining here, so extra bytes mean a broken server.
                return Err(ErrorKind::Http.into());
            }
        }
        None => loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => body += n as u64,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    unclean_close = true;
                    break;
                }
                Err(e) => return Err(Failure::io(&e)),
            }
        },
    }
    if expect_body.is_some_and(|want| want != body) {
        return Err(ErrorKind::BodySize.into());
    }
    Ok(Response {
        body_bytes: body,
        keep_alive: info.content_length.is_some() && info.keep_alive,
        unclean_close,
    })
}

struct Head {
    content_length: Option<u64>,
    keep_alive: bool,
}

fn parse_head(head: &str) -> Result<Head, ErrorKind> {
    let mut lines = head.split("\r\n");
    let status = lines.next().ok_or(ErrorKind::Http)?;
    let mut parts = status.split_ascii_whitespace();
    let version = parts.next().ok_or(ErrorKind::Http)?;
    if !version.starts_with("HTTP/1.") || parts.next() != Some("200") {
        return Err(ErrorKind::Http);
    }
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ErrorKind::Http);
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<u64>().map_err(|_| ErrorKind::Http)?);
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = value.eq_ignore_ascii_case("keep-alive");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked bodies are not produced by the benchmark servers.
            return Err(ErrorKind::Http);
        }
    }
    Ok(Head {
        content_length,
        keep_alive,
    })
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_padding_reaches_the_minimum() {
        let plain = build_request("h", "/", false, None);
        let padded = build_request("h", "/", false, Some(500));
        assert!(padded.len() >= 500, "{}", padded.len());
        assert!(padded.len() < 510);
        assert!(plain.ends_with(b"\r\n\r\n") && padded.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn response_with_length_and_without() {
        let mut scratch = Vec::new();
        let mut with_len: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let r = read_response(&mut with_len, Some(5), &mut scratch).expect("valid response");
        assert_eq!(r.body_bytes, 5);
        assert!(r.keep_alive);
        let mut to_eof: &[u8] = b"HTTP/1.0 200 ok\r\nContent-type: text/html\r\n\r\nabc";
        let r = read_response(&mut to_eof, None, &mut scratch).expect("valid response");
        assert_eq!(r.body_bytes, 3);
        assert!(!r.keep_alive);
        let mut short: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello";
        assert_eq!(
            read_response(&mut short, None, &mut scratch)
                .expect_err("short body")
                .kind,
            ErrorKind::BodySize
        );
        let mut not_found: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            read_response(&mut not_found, None, &mut scratch)
                .expect_err("404")
                .kind,
            ErrorKind::Http
        );
    }
}
