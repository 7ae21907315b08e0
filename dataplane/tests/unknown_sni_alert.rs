//! A listener's `SniFilter` ends a ClientHello for a refused name with a fatal
//! `unrecognized_name` alert, counted as `CloseReason::UnknownSni`, on every io driver; names it
//! allows (and clients without SNI) go through.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::ServerName;
use tlsgate_dataplane::{CloseReason, DataplaneConfig, SniFilter};

/// Handshake error the client sees for `sni` (`None` when the handshake completed).
fn try_name(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    sni: &str,
) -> Option<rustls::Error> {
    let mut sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut conn = rustls::ClientConnection::new(
        cfg.clone(),
        ServerName::try_from(sni.to_owned()).expect("name"),
    )
    .expect("client");
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Some(
                e.into_inner()
                    .and_then(|i| i.downcast::<rustls::Error>().ok())
                    .map(|b| *b)
                    .unwrap_or(rustls::Error::General("io".into())),
            );
        }
    }
    None
}

#[test]
fn a_refused_sni_gets_unrecognized_name_and_a_known_one_is_served() {
    let backend = http_backend();
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    for io in drivers() {
        let mut l = listener("web", tls.clone(), backend);
        l.sni_filter = Some(SniFilter::new(|sni| {
            matches!(sni, None | Some("localhost"))
        }));
        let Some(dp) = start_dp(DataplaneConfig::new(cores()), io, vec![l]) else {
            continue;
        };
        for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let cc = client_config(&p, &[v]);
            let err = try_name(addr(&dp), &cc, "unknown.test").expect("refused");
            assert_eq!(
                err,
                rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName),
                "{io:?} {v:?}"
            );
            let mut t = connect(addr(&dp), &cc);
            let resp = http_get(&mut t).expect("GET");
            assert!(resp.ends_with(HTTP_BODY), "{io:?}: {resp:?}");
        }
        // No SNI at all (an IP address as the server name sends none) passes the filter.
        let mut cc = (*client_config(&p, all_versions())).clone();
        cc.enable_sni = false;
        let mut sock = TcpStream::connect(addr(&dp)).expect("connect");
        let mut conn = rustls::ClientConnection::new(
            Arc::new(cc),
            ServerName::try_from("localhost").expect("name"),
        )
        .expect("client");
        let mut s = rustls::Stream::new(&mut conn, &mut sock);
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            String::from_utf8_lossy(&out).ends_with(HTTP_BODY),
            "{io:?} no SNI"
        );
        eventually("two unknown_sni closes counted", || {
            dp.stats().closed(CloseReason::UnknownSni) == 2
        });
        dp.shutdown(Duration::from_secs(1)).expect("shutdown");
    }
}
