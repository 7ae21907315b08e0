//! What the client's socket receives when the backend ends a connection, on both io drivers:
//! the backend's last bytes, the close_notify after them and the FIN arrive in one TCP segment
//! (each of the three used to be a segment of its own). Counted by the kernel: `ss -ti` reports
//! the client socket's `segs_in`.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use tlsgate_dataplane::DataplaneConfig;
use tlsgate_hw_tests::skip;

const ANSWER: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello";

/// A backend that reads a request, reports it, waits for `go`, then answers and closes with the
/// answer and its FIN in one segment (corked), as a backend closing after its response does on
/// a quick path.
fn answer_on_go() -> (SocketAddr, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (got_tx, got_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (got_tx, go_rx) = (Arc::new(Mutex::new(got_tx)), Arc::new(Mutex::new(go_rx)));
    let addr = tcp_backend(move |mut s| {
        let mut req = Vec::new();
        let mut buf = [0u8; 512];
        while !req.ends_with(b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ = got_tx.lock().map(|tx| tx.send(()));
        if go_rx
            .lock()
            .map(|rx| rx.recv_timeout(Duration::from_secs(20)))
            .is_err()
        {
            return;
        }
        let sock = socket2::SockRef::from(&s);
        let _ = sock.set_tcp_cork(true);
        let _ = s.write_all(ANSWER);
        let _ = s.shutdown(Shutdown::Write);
        // Stay until the data plane closes its side.
        let _ = s.read(&mut buf);
    });
    (addr, got_rx, go_tx)
}

/// TCP segments the socket bound to local port `port` has received (its `segs_in`).
fn segments_in(port: u16) -> u64 {
    let out = Command::new("ss")
        .args(["-tinH", "state", "all", &format!("sport = :{port}")])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let found = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("segs_in:"))
        .and_then(|n| n.parse().ok());
    found.unwrap_or_else(|| panic!("no segs_in for local port {port} in `ss -ti`: {text}"))
}

/// One request; returns the answer read to close_notify and the segments that carried the
/// answer, its close_notify and the FIN.
fn visit(
    to: SocketAddr,
    p: &Pki,
    version: &'static rustls::SupportedProtocolVersion,
    got: &mpsc::Receiver<()>,
    go: &mpsc::Sender<()>,
) -> io::Result<(Vec<u8>, u64)> {
    let mut t = try_connect(to, &client_config(p, &[version]))?;
    handshake(&mut t)?;
    t.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    t.flush()?;
    got.recv_timeout(Duration::from_secs(20))
        .map_err(io::Error::other)?;
    // Let what is still on its way settle (TLS 1.3 tickets, the ACK of the request), so that
    // only the answer is counted.
    thread::sleep(Duration::from_millis(200));
    let port = t.sock.local_addr()?.port();
    let before = segments_in(port);
    go.send(()).map_err(io::Error::other)?;
    let mut answer = Vec::new();
    t.read_to_end(&mut answer)?;
    // close_notify came (read_to_end would fail on an EOF without it); now the FIN.
    let mut rest = [0u8; 16];
    let n = t.sock.read(&mut rest)?;
    assert_eq!(n, 0, "bytes after close_notify");
    Ok((answer, segments_in(port) - before))
}

#[test]
fn the_backends_last_bytes_close_notify_and_fin_reach_the_client_in_one_segment() {
    if !skip::unless(skip::tool_missing("ss", "iproute2")) {
        return;
    }
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let mut counted = Vec::new();
    for io in drivers() {
        let (backend, got, go) = answer_on_go();
        let Some(dp) = start_dp(
            DataplaneConfig::new(cores()),
            io,
            vec![listener("wire", tls.clone(), backend)],
        ) else {
            continue;
        };
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (answer, segments) = visit(addr(&dp), &p, version, &got, &go).expect("answered");
            assert_eq!(answer, ANSWER, "{io:?} {version:?}");
            counted.push(format!("{io:?} {:?}: {segments}", version.version));
        }
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
    assert!(
        counted.iter().all(|c| c.ends_with(": 1")),
        "segments that carried the answer, its close_notify and the FIN: {counted:?}"
    );
}
