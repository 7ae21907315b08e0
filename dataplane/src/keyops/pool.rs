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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

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

/// The pool's queue. Every idle worker waits on `ready` itself, so a request wakes one worker
/// and nothing else, and a worker that finds the queue empty sleeps at once. Measured against
/// the alternatives (full TLS handshakes with a SoftHSM2 key, everything on one CPU): workers
/// taking turns on a lock around std's single-consumer receiver woke the next worker in line for
/// every request only for it to wait again (2 switches per request; 1 here, 8 % less CPU per
/// handshake under load); crossbeam-channel's multi-consumer receiver, whose receivers spin and
/// yield before they sleep, cost 16-36 µs more per handshake than that old queue.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Debug)]
struct QueueState {
    requests: VecDeque<KeyOpRequest>,
    capacity: usize,
    closed: bool,
}

impl Queue {
    /// The next request; `None` once the queue is closed and empty.
    fn take(&self) -> Option<KeyOpRequest> {
        let mut state = self.state.lock();
        loop {
            if let Some(req) = state.requests.pop_front() {
                return Some(req);
            }
            if state.closed {
                return None;
            }
            self.ready.wait(&mut state);
        }
    }
}

/// The pool. Shared by all cores (`submit` takes `&self`).
#[derive(Debug)]
pub struct KeyOpPool {
    queue: Arc<Queue>,
    depth: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl KeyOpPool {
    /// Starts `cfg.workers` threads named `tlsgate-keyop-N`. Each runs `thread_start` on
    /// itself before it takes a request; one that fails stops the pool and is the error.
    pub fn start(cfg: &KeyOpConfig, thread_start: Option<&ThreadStart>) -> Result<Self, Error> {
        let capacity = cfg.queue_depth.max(1);
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                requests: VecDeque::with_capacity(capacity),
                capacity,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let depth = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(Counters::default());
        let mut workers = Vec::with_capacity(cfg.workers);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
        let pool = Self {
            queue,
            depth,
            counters,
            workers: Mutex::new(Vec::new()),
        };
        for i in 0..cfg.workers.max(1) {
            let name = format!("tlsgate-keyop-{i}");
            let queue = pool.queue.clone();
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
                        worker(&queue, &depth, &counters);
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
        {
            let mut state = self.queue.state.lock();
            if state.closed || state.requests.len() >= state.capacity {
                return Err(req);
            }
            self.depth.fetch_add(1, Relaxed);
            state.requests.push_back(req);
        }
        self.queue.ready.notify_one();
        Ok(())
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
        self.queue.state.lock().closed = true;
        self.queue.ready.notify_all();
        let handles = std::mem::take(&mut *self.workers.lock());
        drop(handles);
    }
}

impl Drop for KeyOpPool {
    fn drop(&mut self) {
        self.close();
    }
}

fn worker(queue: &Queue, depth: &AtomicUsize, counters: &Counters) {
    // On Linux a nice value set for a thread id applies to that thread only.
    let tid = rustix::thread::gettid();
    if let Err(err) = rustix::process::setpriority_process(Some(tid), KEY_OP_WORKER_NICE) {
        tracing::debug!(error = %err, "cannot lower the key-op worker's priority");
    }
    loop {
        // The queue's lock is held only while taking a request, never while signing.
        let Some(req) = queue.take() else { return };
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

// Test code only: each `expect` here fails the test that reached it, never a running appliance.
#[cfg(test)]
pub(crate) mod tests {
    use std::sync::mpsc;

    use super::*;

    /// A job that never signs: an empty flight fails on the worker before any key is chosen.
    pub(crate) fn job() -> KeyOpJob {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        KeyOpJob {
            flight: Vec::new(),
            config: Arc::new(config),
            connection: None,
            backend: None,
        }
    }

    /// Voluntary context switches of one thread of this process (`/proc`).
    fn voluntary_switches(tid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            .expect("thread status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches")
    }

    #[test]
    fn a_request_wakes_one_worker_and_no_other() {
        // Each worker says who it is, so only this pool's threads are counted (other tests'
        // pools run in this process too).
        let tids = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let tids = tids.clone();
            ThreadStart(Arc::new(move |_: &str| {
                tids.lock()
                    .push(rustix::thread::gettid().as_raw_nonzero().get());
                Ok(())
            }))
        };
        let cfg = KeyOpConfig {
            workers: 4,
            queue_depth: 64,
            max_in_flight_per_core: 64,
            deadline_ms: 60_000,
        };
        let pool = KeyOpPool::start(&cfg, Some(&hook)).expect("pool");
        let switches = || {
            tids.lock()
                .iter()
                .map(|&t| voluntary_switches(t))
                .sum::<u64>()
        };
        std::thread::sleep(Duration::from_millis(50));
        let before = switches();
        const REQUESTS: u64 = 200;
        for _ in 0..REQUESTS {
            let (tx, rx) = mpsc::channel();
            let req = KeyOpRequest {
                job: job(),
                deadline: Instant::now() + Duration::from_secs(60),
                reply: Box::new(move |r| {
                    let _ = tx.send(r.is_err());
                }),
            };
            assert!(pool.submit(req).is_ok(), "queued");
            assert_eq!(
                rx.recv().ok(),
                Some(true),
                "answered (the empty flight fails)"
            );
            // Long enough for the worker to wait again, so every request finds all four idle.
            std::thread::sleep(Duration::from_micros(300));
        }
        let woke = switches() - before;
        // The worker that takes a request goes back to waiting once: one switch per request.
        // Workers taking turns on a lock around the queue switched twice per request (the next
        // worker in line woke for the lock, only to wait on the queue again).
        assert!(
            (REQUESTS / 2..=REQUESTS * 3 / 2).contains(&woke),
            "{woke} voluntary switches of the workers for {REQUESTS} requests"
        );
        pool.close();
    }
}
