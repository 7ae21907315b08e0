//! The key-operation pool: worker threads that run `Accepted::into_connection()` — and so the
//! token signature inside it — away from the io threads; also the backend handshake's record
//! processing when the backend client key is on the token (see [`super::KeyOpJob`]).
//!
//! The queue is bounded (total `queue_depth`; each core's `Admission` also bounds that core's
//! in-flight count), every request carries a deadline, and a request that waited past it is
//! answered `Deadline` without touching the token. The answer goes back through the request's `reply`
//! closure, which each driver builds to wake its own loop (a tokio oneshot for the portable driver;
//! a channel and the ring's eventfd for io_uring). Workers keep no state between requests, so a
//! token error fails only the handshake that met it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::job::{run_key_op, KeyOpFailure, KeyOpJob, KeyOpResult};
use crate::config::{KeyOpConfig, ThreadStart};
use crate::Error;

/// Nice value of the key-op worker threads. Besides the token call they run the CPU part of the
/// handshake (`into_connection()`: key exchange, key schedule) and may share CPUs with the io
/// threads; a lower scheduling weight lets an io thread that wakes preempt them, so established
/// connections keep their latency while handshakes queue.
pub const KEY_OP_WORKER_NICE: i32 = 5;

/// Where a result goes: called exactly once, on a worker thread (or on the submitting thread when
/// the request is refused).
pub type KeyOpReply = Box<dyn FnOnce(KeyOpResult) + Send>;

/// One request to the pool.
pub struct KeyOpRequest {
    /// What to run.
    pub job: KeyOpJob,
    /// After this instant the request is answered `Deadline` instead of being run.
    pub deadline: Instant,
    /// Delivers the result to the home core.
    pub reply: KeyOpReply,
}

impl std::fmt::Debug for KeyOpRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyOpRequest")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// Past-deadline events are summed into one log line per this interval.
const DEADLINE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the pool itself saw, for metrics (read with [`KeyOpPool::counters`]).
#[derive(Debug, Default)]
struct Counters {
    /// Answered `Deadline` without running: the request waited in the queue past its deadline.
    expired: AtomicU64,
    /// Ran, but the token answered after the deadline: the result was thrown away.
    late: AtomicU64,
    /// When the last past-deadline line was logged, and what was counted since.
    log: Mutex<(Option<Instant>, u64, u64)>,
}

/// A reading of the pool's counters (monotonic, since start) and its depth now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyOpCounters {
    /// Requests queued or running now.
    pub depth: usize,
    /// Requests that waited past their deadline in the queue and were never run.
    pub expired: u64,
    /// Requests whose token call finished after their deadline (the answer was discarded).
    pub late: u64,
    /// Requests refused at once: a core at its in-flight bound, or the queue full (counted by
    /// the cores, which refuse them; filled in by [`crate::Dataplane::key_op_counters`]).
    pub shed: u64,
}

impl KeyOpCounters {
    /// The counters that belong to one token among several (none: the pool is shared, and its
    /// timeouts, late answers and sheds are counted once, on the primary token).
    pub fn only_token(self) -> KeyOpCounters {
        KeyOpCounters {
            depth: self.depth,
            ..KeyOpCounters::default()
        }
    }
}

/// The pool. Shared by all cores (`submit` takes `&self`).
#[derive(Debug)]
pub struct KeyOpPool {
    tx: Mutex<Option<SyncSender<KeyOpRequest>>>,
    depth: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl KeyOpPool {
    /// Starts `cfg.workers` threads named `tlsgate-keyop-N`. Each runs `thread_start` on
    /// itself before it takes a request; one that fails stops the pool and is the error.
    pub fn start(cfg: &KeyOpConfig, thread_start: Option<&ThreadStart>) -> Result<Self, Error> {
        let (tx, rx) = sync_channel::<KeyOpRequest>(cfg.queue_depth.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let depth = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(Counters::default());
        let mut workers = Vec::with_capacity(cfg.workers);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
        let pool = Self {
            tx: Mutex::new(Some(tx)),
            depth,
            counters,
            workers: Mutex::new(Vec::new()),
        };
        for i in 0..cfg.workers.max(1) {
            let name = format!("tlsgate-keyop-{i}");
            let rx = rx.clone();
            let depth = pool.depth.clone();
            let counters = pool.counters.clone();
            let (hook, started) = (thread_start.cloned(), started_tx.clone());
            let thread = name.clone();
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let set_up = hook.map_or(Ok(()), |h| h.run(&thread));
                    let failed = set_up.is_err();
                    let _ = started.send(set_up);
                    if !failed {
                        worker(&rx, &depth, &counters);
                    }
                })
                .map_err(|source| Error::Spawn { name, source })?;
            workers.push(handle);
        }
        drop(started_tx);
        for _ in 0..workers.len() {
            // Every worker sends once before anything else; a closed channel means one ended
            // without sending, which only a panic in the hook does.
            let verdict = started_rx.recv().unwrap_or_else(|_| {
                Err(Error::ThreadStart {
                    thread: "tlsgate-keyop".into(),
                    why: "ended before it was set up".into(),
                })
            });
            verdict?;
        }
        *pool.workers.lock() = workers;
        Ok(pool)
    }

    /// Queues a request. When the queue is full (or the pool is stopping) the request is handed
    /// back so the caller fails that handshake at once.
    pub fn submit(&self, req: KeyOpRequest) -> Result<(), KeyOpRequest> {
        // The sender is cloned out so no lock is held while sending.
        let tx = self.tx.lock().clone();
        let Some(tx) = tx else { return Err(req) };
        self.depth.fetch_add(1, Relaxed);
        match tx.try_send(req) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(req) | TrySendError::Disconnected(req)) => {
                self.depth.fetch_sub(1, Relaxed);
                Err(req)
            }
        }
    }

    /// Requests queued or running now.
    pub fn depth(&self) -> usize {
        self.depth.load(Relaxed)
    }

    /// The pool's counters and its depth now. Read by the metrics exporter about once a second
    /// (`tlsgate_key_op_queue_depth`, `tlsgate_hsm_ops_total{outcome=timeout|late|shed}`), so
    /// nothing on the request path touches the metrics facade.
    pub fn counters(&self) -> KeyOpCounters {
        KeyOpCounters {
            depth: self.depth(),
            expired: self.counters.expired.load(Relaxed),
            late: self.counters.late.load(Relaxed),
            shed: 0,
        }
    }

    /// Closes the queue; workers finish what they hold and exit. Workers are not joined: one
    /// stuck in a hung token call must not hold up process exit.
    pub fn close(&self) {
        *self.tx.lock() = None;
        let handles = std::mem::take(&mut *self.workers.lock());
        drop(handles);
    }
}

impl Drop for KeyOpPool {
    fn drop(&mut self) {
        self.close();
    }
}

fn worker(rx: &Mutex<Receiver<KeyOpRequest>>, depth: &AtomicUsize, counters: &Counters) {
    // On Linux a nice value set for a thread id applies to that thread only.
    let tid = rustix::thread::gettid();
    if let Err(err) = rustix::process::setpriority_process(Some(tid), KEY_OP_WORKER_NICE) {
        tracing::debug!(error = %err, "cannot lower the key-op worker's priority");
    }
    loop {
        // The lock is held only while waiting for the next request, never while signing.
        let req = {
            let guard = rx.lock();
            guard.recv()
        };
        let Ok(req) = req else { return };
        let result = if Instant::now() >= req.deadline {
            counters.expired.fetch_add(1, Relaxed);
            counters.past_deadline(true);
            Err(KeyOpFailure::Deadline)
        } else {
            match run_key_op(req.job) {
                Ok(conn) if Instant::now() > req.deadline => {
                    counters.late.fetch_add(1, Relaxed);
                    counters.past_deadline(false);
                    drop(conn);
                    Err(KeyOpFailure::Deadline)
                }
                other => other,
            }
        };
        depth.fetch_sub(1, Relaxed);
        (req.reply)(result);
    }
}

impl Counters {
    /// Logs past-deadline requests at most once per [`DEADLINE_LOG_INTERVAL`], with the counts
    /// since the last line: a stalled HSM must not flood the log.
    fn past_deadline(&self, expired: bool) {
        let mut log = self.log.lock();
        if expired {
            log.1 += 1;
        } else {
            log.2 += 1;
        }
        let now = Instant::now();
        if log
            .0
            .is_none_or(|t| now.duration_since(t) >= DEADLINE_LOG_INTERVAL)
        {
            tracing::warn!(
                expired_in_queue = log.1,
                finished_late = log.2,
                interval_secs = DEADLINE_LOG_INTERVAL.as_secs(),
                "key operations past their deadline (one line per interval; the HSM is slow or stalled)"
            );
            *log = (Some(now), 0, 0);
        }
    }
}
