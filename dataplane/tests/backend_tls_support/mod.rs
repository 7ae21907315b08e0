//! Harness for the backend-TLS tests: a test CA issuing server and client leaves, rustls echo
//! backends (with or without a PROXY v2 header before the handshake), and the listener and
//! `BackendTls` built from them.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tlsgate_dataplane::conn::BackendTls;
use tlsgate_dataplane::ListenerSnapshot;

use crate::common::*;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A CA able to issue leaves (server or client) with chosen names and validity.
pub struct Ca {
    pub der: CertificateDer<'static>,
    pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

pub struct Leaf {
    pub der: CertificateDer<'static>,
    pub key: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

pub fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("ca");
    Ca {
        der: cert.der().clone(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

impl Ca {
    pub fn leaf(&self, cn: &str, sans: &[&str], expired: bool) -> Leaf {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        for s in sans {
            params.subject_alt_names.push(if s.contains('@') {
                rcgen::SanType::Rfc822Name(s.to_string().try_into().expect("email"))
            } else {
                rcgen::SanType::DnsName(s.to_string().try_into().expect("dns"))
            });
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        Leaf {
            der: cert.der().clone(),
            key: key.serialize_der(),
        }
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(self.der.clone()).expect("root");
        Arc::new(r)
    }
}

/// What a test backend saw on one connection.
#[derive(Debug, Default)]
pub struct Seen {
    pub proxy_tlvs: Option<Vec<(u8, Vec<u8>)>>,
    pub client_cert: Option<CertificateDer<'static>>,
    pub clean_close: bool,
    pub error: Option<String>,
}

/// A TLS echo backend: optional PROXY v2 header in clear first, then TLS with `cfg`; echoes to
/// close_notify, answers with close_notify, reports what it saw.
pub fn tls_echo_backend(cfg: Arc<ServerConfig>, proxy: bool) -> (SocketAddr, mpsc::Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let cfg = cfg.clone();
            let tx = tx.clone();
            thread::spawn(move || {
                let mut seen = Seen::default();
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                if proxy {
                    match read_proxy_v2(&mut s) {
                        Ok(t) => seen.proxy_tlvs = Some(t),
                        Err(e) => {
                            seen.error = Some(format!("PROXY header: {e}"));
                            let _ = tx.send(seen);
                            return;
                        }
                    }
                }
                let conn = rustls::ServerConnection::new(cfg).expect("server conn");
                let mut t = rustls::StreamOwned::new(conn, s);
                let mut buf = [0u8; 16384];
                loop {
                    match t.read(&mut buf) {
                        Ok(0) => {
                            seen.clean_close = true;
                            break;
                        }
                        Ok(n) => {
                            if seen.client_cert.is_none() {
                                seen.client_cert =
                                    t.conn.peer_certificates().and_then(|c| c.first().cloned());
                            }
                            if t.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            seen.error = Some(e.to_string());
                            break;
                        }
                    }
                }
                t.conn.send_close_notify();
                let _ = t.flush();
                let _ = t.conn.complete_io(&mut t.sock);
                let _ = t.sock.shutdown(std::net::Shutdown::Write);
                let _ = tx.send(seen);
            });
        }
    });
    (a, rx)
}

/// A plain echo backend behind a PROXY v2 header.
pub fn proxy_echo_backend() -> (SocketAddr, mpsc::Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut seen = Seen::default();
                match read_proxy_v2(&mut s) {
                    Ok(t) => seen.proxy_tlvs = Some(t),
                    Err(e) => seen.error = Some(e.to_string()),
                }
                let Ok(mut w) = s.try_clone() else { return };
                let _ = io::copy(&mut s, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
                seen.clean_close = true;
                let _ = tx.send(seen);
            });
        }
    });
    (a, rx)
}

/// Reads a PROXY v2 header and returns its TLVs (the addresses are checked by other tests).
pub fn read_proxy_v2(s: &mut TcpStream) -> io::Result<Vec<(u8, Vec<u8>)>> {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed)?;
    if fixed[..12] != *b"\r\n\r\n\0\r\nQUIT\n" || fixed[12] != 0x21 {
        return Err(io::Error::other("not a PROXY v2 header"));
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest)?;
    let addr_len = match fixed[13] {
        0x11 => 12,
        0x21 => 36,
        f => return Err(io::Error::other(format!("family {f:#x}"))),
    };
    parse_tlvs(&rest[addr_len..])
}

pub fn parse_tlvs(mut b: &[u8]) -> io::Result<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 3 {
            return Err(io::Error::other("truncated TLV"));
        }
        let len = usize::from(u16::from_be_bytes([b[1], b[2]]));
        if b.len() < 3 + len {
            return Err(io::Error::other("TLV longer than the header"));
        }
        out.push((b[0], b[3..3 + len].to_vec()));
        b = &b[3 + len..];
    }
    Ok(out)
}

pub fn backend_server_config(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let b = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let b = match client_ca {
        Some(ca) => b.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(ca.roots(), provider())
                .build()
                .expect("verifier"),
        ),
        None => b.with_no_client_auth(),
    };
    Arc::new(
        b.with_single_cert(vec![leaf.der.clone()], leaf.key())
            .expect("backend cert"),
    )
}

pub fn backend_tls(ca: &Ca, name: &str, client: Option<&Leaf>) -> BackendTls {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(ca.roots());
    let cfg = match client {
        Some(c) => b
            .with_client_auth_cert(vec![c.der.clone()], c.key())
            .expect("client cert"),
        None => b.with_no_client_auth(),
    };
    BackendTls {
        config: Arc::new(cfg),
        server_name: ServerName::try_from(name.to_owned()).expect("name"),
        offload_key_ops: false,
    }
}

pub fn tls_listener(
    tls: Arc<ServerConfig>,
    backend: SocketAddr,
    proxy: bool,
    bt: Option<BackendTls>,
) -> ListenerSnapshot {
    let mut l = listener("web", tls, backend);
    l.proxy_protocol = proxy;
    l.backend_tls = bt;
    l
}
