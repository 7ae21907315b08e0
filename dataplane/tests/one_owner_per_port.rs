//! One owner per port: `SO_REUSEPORT` lets any socket of the same user join a listening group,
//! so a second appliance (or anything else) that listens on our address must make start-up fail,
//! never share the traffic. A port whose last owner left (connections in TIME_WAIT) is free.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use socket2::{Domain, Protocol, Socket, Type};
use tlsgate_dataplane::{DataplaneConfig, Error, Snapshot};

/// A listening socket with SO_REUSEPORT, as another tlsgate's core makes them.
fn reuseport_listener() -> (Socket, SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.set_reuse_port(true).expect("SO_REUSEPORT");
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("literal").into())
        .expect("bind");
    s.listen(16).expect("listen");
    let addr = s
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet address");
    (s, addr)
}

fn start_on(
    io: tlsgate_dataplane::IoDriver,
    at: SocketAddr,
) -> Result<tlsgate_dataplane::Dataplane, Error> {
    let p = pki(KeyKind::Ecdsa);
    let (tls, _) = server_config(&p, None);
    let mut l = listener("web", tls, echo_backend());
    l.bind = at;
    let mut cfg = DataplaneConfig::new(vec![0]);
    cfg.io = io;
    tlsgate_dataplane::start(cfg, Arc::new(Snapshot { listeners: vec![l] }))
}

#[test]
fn a_port_another_socket_listens_on_is_a_start_error() {
    let (other, taken) = reuseport_listener();
    for io in drivers() {
        match start_on(io, taken) {
            Err(Error::AddressInUse { listener, addr }) => {
                assert_eq!((listener.as_str(), addr), ("web", taken), "{io:?}");
            }
            Err(Error::UringUnavailable { why }) => {
                tlsgate_hw_tests::skip::missing(format!("driver {io:?}: {why}"));
            }
            Err(e) => panic!("{io:?}: unexpected error {e}"),
            Ok(dp) => {
                let _ = dp.shutdown(Duration::ZERO);
                panic!("{io:?}: started on a port another socket listens on");
            }
        }
    }
    // The other owner keeps its port: a client still reaches it, and only it.
    let mut c = TcpStream::connect(taken).expect("connect to the other owner");
    let (mut s, _) = other.accept().expect("the other owner accepts");
    c.write_all(b"x").expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("read");
}

#[test]
fn a_port_left_in_time_wait_is_free() {
    // Listen, serve one connection and close it from the server side first, so its end of the
    // connection sits in TIME_WAIT on the port; then the listener goes away.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = l.local_addr().expect("addr");
    let c = TcpStream::connect(at).expect("connect");
    let (s, _) = l.accept().expect("accept");
    drop(s);
    drop(l);
    drop(c);
    for io in drivers() {
        match start_on(io, at) {
            Ok(dp) => {
                assert_eq!(dp.local_addrs()[0].1, at, "{io:?}");
                dp.shutdown(Duration::ZERO).expect("shutdown");
            }
            Err(Error::UringUnavailable { why }) => {
                tlsgate_hw_tests::skip::missing(format!("driver {io:?}: {why}"));
            }
            Err(e) => panic!("{io:?}: a port in TIME_WAIT only must be free: {e}"),
        }
    }
}
