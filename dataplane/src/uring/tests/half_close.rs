//! The half-close: a FIN after the queued bytes, reading on afterwards, and done on the core
//! itself (no io-wq thread).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::time::Duration;

use super::{listen_on_localhost, localhost, spawn_loop};
use crate::uring::{ConnectError, Ctl, EventLoopBuilder, Handler, ListenerId, SocketId};

/// Greets, half-closes, keeps reading until the client's FIN, then closes the listener.
#[derive(Default)]
struct HalfCloser {
    listener: Option<ListenerId>,
    got: Vec<u8>,
    eofs: usize,
}

impl Handler for HalfCloser {
    fn on_accept(&mut self, ctl: &mut Ctl, _l: ListenerId, s: SocketId) {
        assert!(ctl.send(s, b"hello"));
        ctl.shutdown_write(s);
        assert!(!ctl.send(s, b"too late"), "send after shutdown_write");
    }
    fn on_data(&mut self, _: &mut Ctl, _: SocketId, d: &[u8]) {
        self.got.extend_from_slice(d);
    }
    fn on_eof(&mut self, ctl: &mut Ctl, s: SocketId) {
        self.eofs += 1;
        ctl.close(s);
        if let Some(l) = self.listener {
            ctl.close_listener(l);
        }
    }
    fn on_error(&mut self, _: &mut Ctl, _: SocketId, e: io::Error) {
        panic!("unexpected socket error {e}");
    }
    fn on_connected(&mut self, _: &mut Ctl, _: SocketId, _: Result<(), ConnectError>) {}
}

#[test]
fn half_close_then_read_on_an_adopted_nonblocking_listener() -> anyhow::Result<()> {
    // The data plane core makes its listeners (non-blocking, SO_REUSEPORT) and hands them over.
    let std_listener = std::net::TcpListener::bind(localhost())?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let running = spawn_loop(
        EventLoopBuilder::new().ring_entries(16),
        HalfCloser::default(),
        move |ctl, h| {
            let l = ctl.adopt_listener(OwnedFd::from(std_listener))?;
            h.listener = Some(l);
            Ok(ctl.listener_addr(l))
        },
    );
    assert_eq!(running.setup, Some(addr));
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    assert_eq!(got, b"hello");
    // Our write side is still open after the server's FIN.
    s.write_all(b"bye")?;
    s.shutdown(std::net::Shutdown::Write)?;
    // The server closes after our FIN; wait for its close to reach us.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    assert!(rest.is_empty());
    let (h, _stats, open) = running.finish()?;
    assert_eq!(h.got, b"bye");
    assert_eq!(h.eofs, 1);
    assert_eq!(open, 0);
    // The listener was closed: nobody listens on that port any more.
    let refused = TcpStream::connect(addr);
    assert!(refused.is_err(), "listener still accepting");
    Ok(())
}

/// The io-wq worker threads the kernel started for the ring made on thread `tid`
/// (`iou-wrk-<tid>`, threads of this process).
fn io_wq_workers_of(tid: &str) -> anyhow::Result<usize> {
    let name = format!("iou-wrk-{tid}");
    let mut n = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        n += usize::from(comm.trim_end() == name);
    }
    Ok(n)
}

#[test]
fn a_half_close_runs_on_the_core_not_on_an_io_wq_thread() -> anyhow::Result<()> {
    // IORING_OP_SHUTDOWN always runs on an io-wq worker: a thread wake-up and two context
    // switches per half-close, which is most connections. The loop shuts down in place.
    let running = spawn_loop(
        EventLoopBuilder::new().ring_entries(16),
        HalfCloser::default(),
        |ctl, h| {
            let tid = std::fs::read_link("/proc/thread-self")?;
            let tid = tid
                .file_name()
                .and_then(|t| t.to_str())
                .ok_or_else(|| anyhow::anyhow!("no thread id in {}", tid.display()))?
                .to_owned();
            let addr = listen_on_localhost(ctl, h)?;
            Ok((addr, tid))
        },
    );
    let (addr, tid) = running.setup.clone();
    for _ in 0..8 {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = Vec::new();
        // The server's FIN ends this read: the half-close happened.
        s.read_to_end(&mut got)?;
        assert_eq!(got, b"hello");
        s.shutdown(std::net::Shutdown::Write)?;
    }
    let workers = io_wq_workers_of(&tid)?;
    let (h, _stats, _open) = running.finish()?;
    assert_eq!(h.eofs, 8);
    assert_eq!(
        workers, 0,
        "the ring started io-wq workers for 8 half-closes"
    );
    Ok(())
}
