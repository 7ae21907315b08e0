//! What a receive delivers stays bounded under backpressure: at most its byte limit (or, on a
//! kernel without one, one buffer once the socket has been paused), not everything a fast peer
//! sends while the core drains the socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use super::{listen_on_localhost, localhost, pattern, spawn_loop};
use crate::uring::{ConnectError, Ctl, EventLoopBuilder, Handler, ListenerId, SocketId};

/// Pause the source once this much is unsent to the sink (the driver's `buffer_bytes`).
const CAP: usize = 32 * 1024;
/// The ring's buffer size: the most one receive completion carries.
const BUF: usize = 16 * 1024;

/// Copies a fast source to a slow sink with the driver's backpressure: pause the source's
/// receive at `CAP` unsent bytes, resume it once the sink has drained.
struct Pump {
    source: SocketAddr,
    sink: Option<SocketId>,
    src: Option<SocketId>,
    reading: bool,
    resumes: usize,
    /// The most the sink ever had unsent, before the first resume and after it.
    max_unsent_first_burst: usize,
    max_unsent_after_resume: usize,
}

impl Handler for Pump {
    fn on_accept(&mut self, ctl: &mut Ctl, _l: ListenerId, s: SocketId) {
        self.sink = Some(s);
        match ctl.connect(self.source, None) {
            Ok(src) => self.src = Some(src),
            Err(e) => panic!("connect to the source: {e}"),
        }
    }
    fn on_data(&mut self, ctl: &mut Ctl, s: SocketId, d: &[u8]) {
        let (Some(sink), Some(src)) = (self.sink, self.src) else {
            return;
        };
        assert_eq!(s, src, "only the source sends");
        assert!(ctl.send(sink, d));
        let unsent = ctl.unsent_bytes(sink);
        let max = if self.resumes == 0 {
            &mut self.max_unsent_first_burst
        } else {
            &mut self.max_unsent_after_resume
        };
        *max = (*max).max(unsent);
        if self.reading && unsent >= CAP {
            self.reading = false;
            ctl.pause_recv(src);
        }
    }
    fn on_eof(&mut self, ctl: &mut Ctl, s: SocketId) {
        if Some(s) == self.src {
            if let Some(sink) = self.sink {
                ctl.close(sink);
            }
            ctl.close(s);
        }
    }
    fn on_error(&mut self, _: &mut Ctl, _: SocketId, e: std::io::Error) {
        panic!("unexpected socket error {e}");
    }
    fn on_connected(&mut self, _: &mut Ctl, _: SocketId, r: Result<(), ConnectError>) {
        if let Err(e) = r {
            panic!("connect to the source: {e:?}");
        }
    }
    fn on_send_drained(&mut self, ctl: &mut Ctl, s: SocketId) {
        if Some(s) == self.sink && !self.reading {
            if let Some(src) = self.src {
                self.reading = true;
                self.resumes += 1;
                ctl.resume_recv(src);
            }
        }
    }
}

/// Runs the pump over 16 MiB with a slow sink; returns it once every byte arrived in order.
fn pump_to_a_slow_reader(builder: EventLoopBuilder) -> anyhow::Result<Pump> {
    let data = pattern(11, 16 * 1024 * 1024);
    let source = TcpListener::bind(localhost())?;
    let pump = Pump {
        source: source.local_addr()?,
        sink: None,
        src: None,
        reading: true,
        resumes: 0,
        max_unsent_first_burst: 0,
        max_unsent_after_resume: 0,
    };
    let running = spawn_loop(
        builder.buf_count(256).buf_size(BUF as u32),
        pump,
        listen_on_localhost,
    );
    let mut sink = TcpStream::connect(running.setup)?;
    sink.set_read_timeout(Some(Duration::from_secs(60)))?;
    // The source writes as fast as the kernel takes it.
    let to_send = data.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = source.accept()?;
        s.write_all(&to_send)
    });
    // The sink reads slowly: the sink's socket buffers fill and backpressure pauses the source.
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = sink.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_micros(500));
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    assert!(got == data, "the sink got every byte in order");
    let (h, _, _) = running.finish()?;
    assert!(
        h.resumes >= 3,
        "the sink was slow enough to pause the source: {}",
        h.resumes
    );
    Ok(h)
}

// Before the bound, a resumed multishot receive handed over up to the whole buffer ring in one
// turn: 4 MiB unsent here, with a pause threshold of 32 KiB.

#[test]
fn a_receive_brings_at_most_its_byte_limit_beyond_the_pause_threshold() -> anyhow::Result<()> {
    let quota = 4 * BUF;
    let limited = EventLoopBuilder::new().build()?.features().recv_limit;
    let h = pump_to_a_slow_reader(EventLoopBuilder::new().recv_quota(quota as u32))?;
    if limited {
        // Every receive carries the limit, the first one included.
        assert!(
            h.max_unsent_first_burst <= CAP + quota + 2 * BUF,
            "before the first resume the sink had {} bytes unsent (limit {quota})",
            h.max_unsent_first_burst
        );
    }
    // Where the kernel takes the limit, a resumed receive ends after `quota` bytes (its last
    // buffer may pass it); where it does not, it is single-shot and brings less. A receive in
    // flight when the pause is asked for may bring one buffer more.
    assert!(
        h.max_unsent_after_resume <= CAP + quota + 2 * BUF,
        "after a resume the sink had {} bytes unsent (pause at {CAP}, limit {quota}; first \
         burst {})",
        h.max_unsent_after_resume,
        h.max_unsent_first_burst
    );
    Ok(())
}

#[test]
fn without_the_kernels_byte_limit_a_resumed_receive_brings_one_buffer() -> anyhow::Result<()> {
    let h = pump_to_a_slow_reader(EventLoopBuilder::new().without_recv_limit())?;
    assert!(
        h.max_unsent_after_resume <= CAP + 2 * BUF,
        "after a resume the sink had {} bytes unsent (pause at {CAP}; first burst {})",
        h.max_unsent_after_resume,
        h.max_unsent_first_burst
    );
    Ok(())
}

/// The kernel's release as (major, minor), from `uname -r`'s source.
fn kernel_release() -> Option<(u32, u32)> {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = r.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[test]
fn the_byte_limit_probe_agrees_with_the_kernel_release() -> anyhow::Result<()> {
    let lp = EventLoopBuilder::new().build()?;
    let Some(release) = kernel_release() else {
        anyhow::bail!("no kernel release in /proc/sys/kernel/osrelease");
    };
    // Multishot recv's byte limit came with Linux 6.17; a vendor kernel may carry it earlier,
    // so only a release that must have it is checked for it.
    if release >= (6, 17) {
        assert!(
            lp.features().recv_limit,
            "Linux {release:?}: {}",
            lp.features()
        );
    } else if !lp.features().recv_limit {
        println!(
            "Linux {release:?}: no multishot recv byte limit; resumed receives are single-shot"
        );
    }
    Ok(())
}
