//! The ring machinery on plain TCP, against real sockets on 127.0.0.1.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;

/// Wraps a handler so the test thread can stop the loop through its waker.
struct Stoppable<H> {
    inner: H,
    stop: Arc<AtomicBool>,
}

impl<H: Handler> Handler for Stoppable<H> {
    fn on_accept(&mut self, ctl: &mut Ctl, l: ListenerId, s: SocketId) {
        self.inner.on_accept(ctl, l, s)
    }
    fn on_data(&mut self, ctl: &mut Ctl, s: SocketId, d: &[u8]) {
        self.inner.on_data(ctl, s, d)
    }
    fn on_eof(&mut self, ctl: &mut Ctl, s: SocketId) {
        self.inner.on_eof(ctl, s)
    }
    fn on_error(&mut self, ctl: &mut Ctl, s: SocketId, e: io::Error) {
        self.inner.on_error(ctl, s, e)
    }
    fn on_connected(&mut self, ctl: &mut Ctl, s: SocketId, r: Result<(), ConnectError>) {
        self.inner.on_connected(ctl, s, r)
    }
    fn on_send_drained(&mut self, ctl: &mut Ctl, s: SocketId) {
        self.inner.on_send_drained(ctl, s)
    }
    fn on_tick(&mut self, ctl: &mut Ctl) {
        self.inner.on_tick(ctl)
    }
    fn on_wake(&mut self, ctl: &mut Ctl) {
        if self.stop.load(Ordering::Acquire) {
            ctl.stop();
        }
        self.inner.on_wake(ctl)
    }
}

struct Running<H, T> {
    thread: JoinHandle<anyhow::Result<(H, LoopStats, usize)>>,
    waker: Waker,
    stop: Arc<AtomicBool>,
    setup: T,
}

impl<H, T> Running<H, T> {
    /// Stops the loop; returns the handler, the counters and the sockets still open.
    fn finish(self) -> anyhow::Result<(H, LoopStats, usize)> {
        self.stop.store(true, Ordering::Release);
        self.waker.wake()?;
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("loop thread panicked"))?
    }
}

/// Builds a loop on its own thread, runs `setup` there, and starts it.
fn spawn_loop<H, T, F>(builder: EventLoopBuilder, handler: H, setup: F) -> Running<H, T>
where
    H: Handler + Send + 'static,
    T: Send + 'static,
    F: FnOnce(&mut Ctl, &mut H) -> anyhow::Result<T> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut handler = handler;
        let mut lp = match builder.build() {
            Ok(lp) => lp,
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("build: {e}")));
                return Err(anyhow::anyhow!("build failed"));
            }
        };
        match setup(lp.ctl(), &mut handler) {
            Ok(t) => {
                let _ = tx.send(Ok((t, lp.waker())));
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return Err(anyhow::anyhow!("setup failed"));
            }
        }
        let mut h = Stoppable {
            inner: handler,
            stop: stop2,
        };
        lp.run(&mut h)?;
        let stats = lp.ctl().stats().clone();
        let open = lp.ctl().socket_count();
        Ok((h.inner, stats, open))
    });
    let (setup, waker) = rx
        .recv()
        .expect("the loop thread sends exactly one set-up result")
        .expect("loop set-up");
    Running {
        thread,
        waker,
        stop,
        setup,
    }
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Opens one listener on 127.0.0.1 and returns its address: the set-up of a [`spawn_loop`]
/// whose test connects to the loop.
fn listen_on_localhost<H>(ctl: &mut Ctl, _: &mut H) -> anyhow::Result<SocketAddr> {
    let l = ctl.listen(localhost())?;
    ctl.listener_addr(l)
        .ok_or_else(|| anyhow::anyhow!("no address"))
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An echo server and an L4 proxy in front of it, both in the same ring.
#[derive(Default)]
struct EchoProxy {
    front: Option<ListenerId>,
    backend: Option<SocketAddr>,
    echo: HashSet<SocketId>,
    peer: HashMap<SocketId, SocketId>,
    connected: usize,
}

impl EchoProxy {
    fn close_pair(&mut self, ctl: &mut Ctl, sock: SocketId) {
        ctl.close(sock);
        if let Some(other) = self.peer.remove(&sock) {
            self.peer.remove(&other);
            ctl.close(other);
        }
    }
}

impl Handler for EchoProxy {
    fn on_accept(&mut self, ctl: &mut Ctl, l: ListenerId, s: SocketId) {
        if Some(l) != self.front {
            self.echo.insert(s);
            return;
        }
        let Some(backend) = self.backend else {
            ctl.abort(s);
            return;
        };
        match ctl.connect(backend, Some(Duration::from_secs(5))) {
            Ok(b) => {
                self.peer.insert(s, b);
                self.peer.insert(b, s);
            }
            Err(_) => ctl.abort(s),
        }
    }
    fn on_data(&mut self, ctl: &mut Ctl, s: SocketId, d: &[u8]) {
        if self.echo.contains(&s) {
            ctl.send(s, d);
        } else if let Some(&p) = self.peer.get(&s) {
            // Sent before the backend connect completes: the loop queues it.
            ctl.send(p, d);
        }
    }
    fn on_eof(&mut self, ctl: &mut Ctl, s: SocketId) {
        if self.echo.remove(&s) {
            ctl.close(s);
        } else {
            self.close_pair(ctl, s);
        }
    }
    fn on_error(&mut self, ctl: &mut Ctl, s: SocketId, _e: io::Error) {
        self.echo.remove(&s);
        if let Some(p) = self.peer.remove(&s) {
            self.peer.remove(&p);
            ctl.abort(p);
        }
        ctl.abort(s);
    }
    fn on_connected(&mut self, ctl: &mut Ctl, s: SocketId, r: Result<(), ConnectError>) {
        match r {
            Ok(()) => self.connected += 1,
            Err(_) => {
                if let Some(p) = self.peer.remove(&s) {
                    self.peer.remove(&p);
                    ctl.abort(p);
                }
            }
        }
    }
}

fn start_echo_proxy(builder: EventLoopBuilder) -> Running<EchoProxy, SocketAddr> {
    spawn_loop(builder, EchoProxy::default(), |ctl, h| {
        let echo = ctl.listen(localhost())?;
        let front = ctl.listen(localhost())?;
        h.front = Some(front);
        h.backend = ctl.listener_addr(echo);
        ctl.listener_addr(front)
            .ok_or_else(|| anyhow::anyhow!("no front address"))
    })
}

#[test]
fn echo_proxy_many_concurrent_connections() -> anyhow::Result<()> {
    let running = start_echo_proxy(EventLoopBuilder::new().ring_entries(256));
    let front = running.setup;
    const THREADS: u64 = 8;
    const CONNS_PER_THREAD: u64 = 8;
    const BYTES: usize = 96 * 1024;
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut conns = Vec::new();
                for c in 0..CONNS_PER_THREAD {
                    let data = pattern(t * 100 + c, BYTES);
                    let mut s = TcpStream::connect(front)?;
                    s.set_read_timeout(Some(Duration::from_secs(20)))?;
                    s.write_all(&data)?;
                    conns.push((s, data));
                }
                for (mut s, data) in conns {
                    let mut back = vec![0u8; data.len()];
                    s.read_exact(&mut back)?;
                    anyhow::ensure!(back == data, "echo differs");
                }
                Ok(())
            })
        })
        .collect();
    for c in clients {
        c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let (h, stats, _open) = running.finish()?;
    let conns = (THREADS * CONNS_PER_THREAD) as usize;
    assert_eq!(h.connected, conns);
    assert_eq!(stats.accepted, 2 * conns as u64);
    // In the ring, each byte is received three times: proxy from client, echo from proxy,
    // proxy from echo.
    assert_eq!(stats.bytes_received, 3 * (conns * BYTES) as u64);
    assert_eq!(stats.bytes_sent, stats.bytes_received);
    Ok(())
}

#[test]
fn sockets_are_closed_after_peers_leave() -> anyhow::Result<()> {
    let running = start_echo_proxy(EventLoopBuilder::new().ring_entries(64));
    let front = running.setup;
    for i in 0..16 {
        let mut s = TcpStream::connect(front)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&[i; 100])?;
        let mut back = [0u8; 100];
        s.read_exact(&mut back)?;
        assert_eq!(back, [i; 100]);
        s.shutdown(std::net::Shutdown::Write)?;
        // The proxy closes both sides on EOF: we must see EOF too.
        assert_eq!(s.read(&mut back)?, 0);
    }
    let (h, _stats, open) = running.finish()?;
    assert!(h.peer.is_empty(), "pairs left: {}", h.peer.len());
    // The echo side closes on its own EOF, which may still be in flight for the last pair.
    assert!(open <= 1, "sockets still open: {open}");
    Ok(())
}

/// Sends large chunks to every accepted client, then closes gracefully.
struct Blaster {
    chunks: Vec<Vec<u8>>,
    drained: usize,
}

impl Handler for Blaster {
    fn on_accept(&mut self, ctl: &mut Ctl, _l: ListenerId, s: SocketId) {
        for c in &self.chunks {
            assert!(ctl.send(s, c));
        }
        assert_eq!(
            ctl.unsent_bytes(s),
            self.chunks.iter().map(Vec::len).sum::<usize>()
        );
        ctl.close(s);
        assert!(!ctl.send(s, b"after close"));
    }
    fn on_data(&mut self, _: &mut Ctl, _: SocketId, _: &[u8]) {}
    fn on_eof(&mut self, _: &mut Ctl, _: SocketId) {}
    fn on_error(&mut self, _: &mut Ctl, _: SocketId, e: io::Error) {
        panic!("unexpected socket error {e}");
    }
    fn on_connected(&mut self, _: &mut Ctl, _: SocketId, _: Result<(), ConnectError>) {}
    fn on_send_drained(&mut self, _: &mut Ctl, _: SocketId) {
        self.drained += 1;
    }
}

#[test]
fn partial_writes_keep_order_to_a_slow_reader() -> anyhow::Result<()> {
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| pattern(i, 3 * 1024 * 1024)).collect();
    let expected: Vec<u8> = chunks.concat();
    let blaster = Blaster { chunks, drained: 0 };
    let running = spawn_loop(
        EventLoopBuilder::new().ring_entries(32),
        blaster,
        listen_on_localhost,
    );
    let mut s = TcpStream::connect(running.setup)?;
    // 12 MiB is more than a loopback socket buffer holds: the kernel takes it in short sends
    // as the reader drains it.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut got = Vec::with_capacity(expected.len());
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "bytes arrived out of order");
    let (h, stats, open) = running.finish()?;
    assert!(stats.partial_sends > 0, "no partial write happened");
    // Closing sockets get no events, drained included.
    assert_eq!(h.drained, 0);
    assert_eq!(open, 0);
    Ok(())
}

/// Sends three chunks in one turn (they go out as one send: a send joins the one the turn
/// already made) twice over, and notes after each drain what the core keeps for reuse and what
/// the socket still holds.
struct Recycler {
    chunk: Vec<u8>,
    /// Per drain: (spare buffers, their capacities sorted, the socket's queue capacity).
    drains: Vec<(usize, Vec<usize>, usize)>,
}

impl Recycler {
    fn send_three(&self, ctl: &mut Ctl, s: SocketId) {
        for _ in 0..3 {
            assert!(ctl.send(s, &self.chunk));
        }
    }
}

impl Handler for Recycler {
    fn on_accept(&mut self, ctl: &mut Ctl, _l: ListenerId, s: SocketId) {
        self.send_three(ctl, s);
    }
    fn on_data(&mut self, _: &mut Ctl, _: SocketId, _: &[u8]) {}
    fn on_eof(&mut self, _: &mut Ctl, _: SocketId) {}
    fn on_error(&mut self, _: &mut Ctl, _: SocketId, e: io::Error) {
        panic!("unexpected socket error {e}");
    }
    fn on_connected(&mut self, _: &mut Ctl, _: SocketId, _: Result<(), ConnectError>) {}
    fn on_send_drained(&mut self, ctl: &mut Ctl, s: SocketId) {
        let mut caps: Vec<usize> = ctl.spare.iter().map(Vec::capacity).collect();
        caps.sort_unstable();
        let queued = ctl
            .socks
            .get(s.0)
            .map_or(usize::MAX, |s| s.queued.capacity());
        self.drains.push((ctl.spare.len(), caps, queued));
        if self.drains.len() == 1 {
            self.send_three(ctl, s);
        } else {
            ctl.close(s);
        }
    }
}

#[test]
fn send_buffers_are_kept_by_the_core_and_reused_not_held_by_idle_sockets() -> anyhow::Result<()> {
    let chunk = pattern(7, 256 * 1024);
    let expected: Vec<u8> = [&chunk[..]; 6].concat();
    let recycler = Recycler {
        chunk,
        drains: Vec::new(),
    };
    let running = spawn_loop(EventLoopBuilder::new(), recycler, listen_on_localhost);
    let mut s = TcpStream::connect(running.setup)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    assert!(got == expected, "the two rounds arrived whole and in order");
    let (h, _, _) = running.finish()?;
    assert_eq!(h.drains.len(), 2, "two drains: {:?}", h.drains);
    for (spare, caps, queued) in &h.drains {
        // One send for the three chunks (not one plus a queue behind it), its buffer back with
        // the core...
        assert_eq!(*spare, 1, "kept after a drain: {caps:?}");
        assert!(caps[0] >= 3 * 256 * 1024, "kept after a drain: {caps:?}");
        // ...and a drained socket holds none.
        assert_eq!(*queued, 0);
    }
    // The second round reused the first round's buffers instead of growing new ones.
    assert_eq!(h.drains[0].1, h.drains[1].1);
    Ok(())
}

#[test]
fn recv_rearms_when_the_buffer_ring_runs_dry() -> anyhow::Result<()> {
    // Two 64-byte buffers: any burst larger than 128 bytes ends the multishot recv with ENOBUFS.
    let builder = EventLoopBuilder::new()
        .ring_entries(32)
        .buf_count(2)
        .buf_size(64);
    let running = start_echo_proxy(builder);
    let mut s = TcpStream::connect(running.setup)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let data = pattern(7, 256 * 1024);
    let mut writer = s.try_clone()?;
    let to_send = data.clone();
    let w = std::thread::spawn(move || writer.write_all(&to_send));
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back)?;
    w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    assert!(back == data, "echo differs");
    let (_h, stats, _) = running.finish()?;
    assert!(stats.enobufs_rearms > 0, "{stats:?}");
    assert!(stats.recv_rearms >= stats.enobufs_rearms);
    Ok(())
}

#[derive(Default)]
struct Connector {
    results: Vec<(SocketId, Result<(), String>, bool)>,
}

impl Handler for Connector {
    fn on_accept(&mut self, _: &mut Ctl, _: ListenerId, _: SocketId) {}
    fn on_data(&mut self, _: &mut Ctl, _: SocketId, _: &[u8]) {}
    fn on_eof(&mut self, _: &mut Ctl, _: SocketId) {}
    fn on_error(&mut self, _: &mut Ctl, _: SocketId, _: io::Error) {}
    fn on_connected(&mut self, ctl: &mut Ctl, s: SocketId, r: Result<(), ConnectError>) {
        let timed_out = matches!(r, Err(ConnectError::TimedOut));
        if r.is_err() {
            // A failed connect's id is dead: calls on it are ignored.
            assert!(!ctl.send(s, b"x"));
        }
        self.results
            .push((s, r.map_err(|e| e.to_string()), timed_out));
        if self.results.len() == 2 {
            ctl.stop();
        }
    }
}

/// A TCP socket bound to a loopback port without listening: connects to it are refused, and
/// the port stays ours for the test.
fn refusing_port() -> anyhow::Result<(OwnedFd, SocketAddr)> {
    let fd = sys::connect_socket(&localhost())?;
    let raw = sys::from_socket_addr(localhost());
    // SAFETY: raw holds a valid sockaddr of raw.len bytes; fd is a live socket.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &raw.storage as *const _ as *const libc::sockaddr,
            raw.len,
        )
    };
    anyhow::ensure!(rc == 0, "bind: {}", io::Error::last_os_error());
    let addr = sys::local_addr(fd.as_raw_fd())?;
    Ok((fd, addr))
}

#[test]
fn connect_times_out_on_a_full_backlog_and_reports_refusal() -> anyhow::Result<()> {
    // Backlog 0 holds one completed connection; with nobody accepting, later SYNs are dropped,
    // so a connect there hangs until its deadline.
    let full = sys::reuseport_listener(localhost(), 0)?;
    let full_addr = sys::local_addr(full.as_raw_fd())?;
    let _filler = TcpStream::connect(full_addr)?;
    let (_refuser, refused_addr) = refusing_port()?;

    let running = spawn_loop(
        EventLoopBuilder::new().ring_entries(16),
        Connector::default(),
        move |ctl, _| {
            let slow = ctl.connect(full_addr, Some(Duration::from_millis(300)))?;
            ctl.send(slow, b"queued before connect");
            let refused = ctl.connect(refused_addr, Some(Duration::from_secs(5)))?;
            Ok((slow, refused))
        },
    );
    let (slow, refused) = running.setup;
    let (h, stats, open) = running
        .thread
        .join()
        .map_err(|_| anyhow::anyhow!("loop panicked"))??;
    let by_id: HashMap<_, _> = h.results.iter().map(|r| (r.0, r)).collect();
    let slow_r = by_id
        .get(&slow)
        .ok_or_else(|| anyhow::anyhow!("no result for slow"))?;
    assert!(slow_r.2, "expected a timeout, got {:?}", slow_r.1);
    let refused_r = by_id
        .get(&refused)
        .ok_or_else(|| anyhow::anyhow!("no result for refused"))?;
    let msg = refused_r.1.as_ref().err().cloned().unwrap_or_default();
    assert!(msg.contains("refused"), "expected refusal, got {msg:?}");
    assert_eq!(stats.connect_timeouts, 1);
    assert_eq!(open, 0);
    drop(full);
    Ok(())
}

#[test]
fn waker_and_tick_reach_the_handler() -> anyhow::Result<()> {
    #[derive(Default)]
    struct Counter {
        wakes: usize,
        ticks: usize,
    }
    impl Handler for Counter {
        fn on_accept(&mut self, _: &mut Ctl, _: ListenerId, _: SocketId) {}
        fn on_data(&mut self, _: &mut Ctl, _: SocketId, _: &[u8]) {}
        fn on_eof(&mut self, _: &mut Ctl, _: SocketId) {}
        fn on_error(&mut self, _: &mut Ctl, _: SocketId, _: io::Error) {}
        fn on_connected(&mut self, _: &mut Ctl, _: SocketId, _: Result<(), ConnectError>) {}
        fn on_tick(&mut self, ctl: &mut Ctl) {
            self.ticks += 1;
            if self.ticks == 3 && self.wakes > 0 {
                ctl.stop();
            }
        }
        fn on_wake(&mut self, _: &mut Ctl) {
            self.wakes += 1;
        }
    }
    // The external eventfd stands for the key-op pool's per-core completion signal.
    let external = sys::eventfd()?;
    let watched = external.try_clone()?;
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || -> anyhow::Result<Counter> {
        let mut lp = EventLoopBuilder::new()
            .ring_entries(8)
            .tick(Duration::from_millis(10))
            .build()?;
        lp.watch_eventfd(watched);
        tx.send(())?;
        let mut c = Counter::default();
        lp.run(&mut c)?;
        Ok(c)
    });
    rx.recv()?;
    sys::eventfd_signal(external.as_raw_fd())?;
    let c = t.join().map_err(|_| anyhow::anyhow!("loop panicked"))??;
    assert!(c.wakes >= 1);
    assert!(c.ticks >= 3);
    Ok(())
}

#[test]
fn builder_pins_the_thread() -> anyhow::Result<()> {
    let cores = current_thread_affinity()?;
    let Some(&core) = cores.last() else {
        anyhow::bail!("no CPU in our affinity mask");
    };
    let pinned = std::thread::spawn(move || -> anyhow::Result<Vec<usize>> {
        let _lp = EventLoopBuilder::new()
            .ring_entries(8)
            .pin_to_core(core)
            .build()?;
        Ok(current_thread_affinity()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))??;
    assert_eq!(pinned, vec![core]);
    Ok(())
}

#[test]
fn bad_buffer_ring_size_is_an_error_not_a_panic() {
    let err = EventLoopBuilder::new().ring_entries(8).buf_count(3).build();
    assert!(matches!(
        err,
        Err(UringError::Setup {
            step: "register_buf_ring",
            ..
        })
    ));
}

#[test]
fn stale_ids_are_ignored() -> anyhow::Result<()> {
    let mut lp = EventLoopBuilder::new().ring_entries(8).build()?;
    let (_refuser, addr) = refusing_port()?;
    let ctl = lp.ctl();
    let s = ctl.connect(addr, None)?;
    ctl.abort(s);
    assert!(!ctl.send(s, b"x"));
    ctl.pause_recv(s);
    ctl.resume_recv(s);
    ctl.close(s);
    assert_eq!(ctl.unsent_bytes(s), 0);
    assert_eq!(ctl.peer_addr(s), None);
    // Dropping the loop cancels the in-flight connect and waits for it.
    drop(lp);
    Ok(())
}

#[test]
fn shutdown_gets_back_every_operation() -> anyhow::Result<()> {
    let mut lp = EventLoopBuilder::new().ring_entries(16).build()?;
    let (_refuser, refused) = refusing_port()?;
    let ctl = lp.ctl();
    let addr = listen_on_localhost(ctl, &mut ())?;
    // Work in every state: a pending accept, a connect in flight, a queued send, a wake-up
    // signalled but not yet read.
    let _client = TcpStream::connect(addr)?;
    let connect_timeout = Duration::from_secs(5);
    let s = ctl.connect(refused, Some(connect_timeout))?;
    ctl.send(s, b"never sent");
    lp.waker().wake()?;
    let started = std::time::Instant::now();
    assert!(lp.drain(), "operations left in flight");
    // Draining cancels the connect and its timeout rather than waiting them out.
    assert!(
        started.elapsed() < connect_timeout / 5,
        "drain took {:?}: it waited for the connect timeout",
        started.elapsed()
    );
    Ok(())
}

/// "Ready" means ready: a core whose ring cannot be set up (here its eventfd, refused by a
/// seccomp filter after the probe, which makes none, has passed) makes `start` fail with that
/// core's error instead of returning a data plane that has no core. The cores that did come up
/// are stopped.
#[test]
fn a_core_that_cannot_set_up_its_ring_fails_the_start() {
    if !tlsgate_hw_tests::skip::unless(tlsgate_hw_tests::skip::io_uring_sysctl_off()) {
        return;
    }
    let got = std::thread::spawn(|| {
        super::probe::tests::refuse_syscall_on_this_thread(
            libc::SYS_eventfd2,
            libc::EMFILE as u32,
        )?;
        let mut cfg = crate::DataplaneConfig::new(vec![0]);
        cfg.io = crate::IoDriver::Uring;
        let snapshot = Arc::new(crate::Snapshot {
            listeners: Vec::new(),
        });
        Ok::<_, io::Error>(crate::start(cfg, snapshot).map(|dp| dp.driver()))
    })
    .join()
    .expect("the filter thread does not panic");
    match got {
        Err(e) => tlsgate_hw_tests::skip::missing(format!("cannot install a seccomp filter: {e}")),
        Ok(Err(crate::Error::Worker { core, why })) => {
            assert_eq!(core, 0);
            assert!(why.contains("eventfd"), "the cause is named: {why}");
        }
        Ok(other) => panic!("start with a core that has no ring: {other:?}"),
    }
    // Without the filter the same configuration starts: the filter made the difference.
    let mut cfg = crate::DataplaneConfig::new(vec![0]);
    cfg.io = crate::IoDriver::Uring;
    let dp = crate::start(
        cfg,
        Arc::new(crate::Snapshot {
            listeners: Vec::new(),
        }),
    )
    .expect("start");
    dp.shutdown(Duration::ZERO).expect("shutdown");
}

mod backpressure;
mod half_close;
