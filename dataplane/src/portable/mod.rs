//! The portable driver: one tokio current-thread runtime per pinned worker thread (epoll), the
//! same per-core SO_REUSEPORT sockets and the same sans-io [`crate::conn::Conn`] as io_uring.
//! It is the reference implementation of the contract in `crate::driver`.

mod conn_task;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::LocalSet;

use crate::driver::{CoreSetup, ReadySignal, Shared};
use crate::keyops::Admission;
use crate::stats::{CoreRecorder, FLUSH_INTERVAL};
use crate::Error;

/// Back-off after an accept error (EMFILE, ENOBUFS): the error is the kernel's, not readiness.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// One core's state, shared by its tasks (single thread: `Rc`, `Cell`, `RefCell`).
pub(super) struct Core {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub recorder: RefCell<CoreRecorder>,
    pub open: Cell<usize>,
    pub handshaking: Cell<usize>,
    /// The gate in front of the key-op pool for this core's connections.
    pub key_ops: Admission,
    /// Woken when a connection closes or finishes its handshake (accept may resume).
    pub capacity: Notify,
    /// Woken when a connection closes (drain progress).
    pub closed: Notify,
    pub scratch: RefCell<Vec<u8>>,
}

/// Runs one core until shutdown and drain complete.
pub(crate) fn run_core(setup: CoreSetup) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Worker {
            core: setup.index,
            why: format!("tokio runtime: {e}"),
        })?;
    let chunk = setup.shared.cfg.limits.read_chunk_bytes;
    let core = Rc::new(Core {
        index: setup.index,
        shared: setup.shared.clone(),
        recorder: RefCell::new(setup.recorder),
        open: Cell::new(0),
        handshaking: Cell::new(0),
        key_ops: Admission::new(&setup.shared.cfg.key_ops),
        capacity: Notify::new(),
        closed: Notify::new(),
        scratch: RefCell::new(vec![0; chunk]),
    });
    let stop = Arc::new(Notify::new());
    {
        let stop = stop.clone();
        setup
            .shared
            .shutdown
            .register(Box::new(move || stop.notify_one()));
    }
    let local = LocalSet::new();
    let result = local.block_on(&rt, serve(core.clone(), setup.listeners, stop, setup.ready));
    // Tasks still alive (past the drain deadline) are dropped here, inside the runtime, so their
    // sockets deregister cleanly; their guards count them as `Shutdown`.
    drop(local);
    core.recorder.borrow_mut().flush();
    result
}

async fn serve(
    core: Rc<Core>,
    listeners: Vec<(usize, std::net::TcpListener)>,
    stop: Arc<Notify>,
    ready: ReadySignal,
) -> Result<(), Error> {
    let mut accepting = Vec::new();
    for (i, l) in listeners {
        let l = TcpListener::from_std(l).map_err(|e| Error::Worker {
            core: core.index,
            why: format!("registering listener: {e}"),
        })?;
        accepting.push(tokio::task::spawn_local(accept_loop(core.clone(), i, l)));
    }
    // The runtime and every listening socket (registered with epoll) are in place.
    ready.ready()?;
    let flusher = {
        let core = core.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(FLUSH_INTERVAL);
            loop {
                tick.tick().await;
                core.recorder.borrow_mut().flush();
            }
        })
    };
    while !core.shared.shutdown.is_requested() {
        stop.notified().await;
    }
    // Aborting the accept tasks drops (closes) this core's listening sockets.
    for t in &accepting {
        t.abort();
    }
    let deadline = tokio::time::Instant::from_std(core.shared.shutdown.deadline());
    while core.open.get() > 0 {
        tokio::select! {
            _ = core.closed.notified() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    if core.open.get() > 0 {
        tracing::info!(
            core = core.index,
            open = core.open.get(),
            "drain deadline reached, closing the remaining connections"
        );
    }
    flusher.abort();
    Ok(())
}

async fn accept_loop(core: Rc<Core>, listener_index: usize, listener: TcpListener) {
    let limits = &core.shared.cfg.limits;
    // With the real port when the configuration says port 0.
    let bound = listener.local_addr().ok();
    loop {
        if core.open.get() >= limits.max_connections_per_core
            || core.handshaking.get() >= limits.max_handshakes_in_flight
        {
            core.recorder.borrow().accept_paused();
            while core.open.get() >= limits.max_connections_per_core
                || core.handshaking.get() >= limits.max_handshakes_in_flight
            {
                core.capacity.notified().await;
            }
        }
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::task::spawn_local(conn_task::run(
                    core.clone(),
                    listener_index,
                    stream,
                    peer,
                    bound,
                ));
                // Let the new connection register itself (open, handshaking) before the limits
                // are checked for the next accept; otherwise each check would miss the
                // connection accepted just before it and admit one too many.
                tokio::task::yield_now().await;
            }
            Err(e) => {
                core.recorder
                    .borrow_mut()
                    .accept_error(e.raw_os_error(), Instant::now());
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}
