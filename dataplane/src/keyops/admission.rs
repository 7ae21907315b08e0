//! The one gate every core puts between its connections and the shared key-op pool, for both
//! io drivers: at most `max_in_flight_per_core` key operations of this core in flight, each with
//! its deadline, and the per-core counters kept in step (`queued` on admission, `rejected` on a
//! refusal, one of `ok`/`failed`/`peer_refused`/`timed_out`/`late` when it ends).
//!
//! A driver only moves the answer: it builds the request's reply (a oneshot into its runtime, or
//! a channel and its ring's eventfd), keeps the [`Admitted`] beside its connection, wakes the
//! connection at [`Admitted::deadline`] if no answer came, and hands the `Admitted` back to
//! [`Admission::finish`] exactly once, however the key op ended.

use std::cell::Cell;
use std::time::{Duration, Instant};

use super::job::{KeyOpFailure, KeyOpJob};
use super::pool::{KeyOpPool, KeyOpReply, KeyOpRequest};
use crate::config::KeyOpConfig;
use crate::stats::{CoreRecorder, KeyOpOutcome};

/// One core's admission gate. Owned by its core (not `Sync`): no atomics on the handshake path.
#[derive(Debug)]
pub(crate) struct Admission {
    max_in_flight: usize,
    deadline: Duration,
    in_flight: Cell<usize>,
}

/// A key operation the gate let through: it holds one of the core's slots until it is handed to
/// [`Admission::finish`].
#[derive(Debug)]
#[must_use = "an admitted key operation holds a slot until Admission::finish"]
pub(crate) struct Admitted {
    since: Instant,
    deadline: Instant,
}

impl Admitted {
    /// When the connection stops waiting: its handshake then fails as `key_op_timeout`, and a
    /// later answer is discarded.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Admission {
    /// The gate for one core, with the pool's per-core bound and deadline.
    pub(crate) fn new(cfg: &KeyOpConfig) -> Self {
        Self {
            max_in_flight: cfg.max_in_flight_per_core,
            deadline: cfg.deadline(),
            in_flight: Cell::new(0),
        }
    }

    /// Key operations of this core admitted and not finished.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Offers `job` (handed out by a connection at `now`) to `pool`. Admitted, `reply` gets the
    /// answer on a worker. Refused (this core at its bound, or the pool's queue full or
    /// closed), it is counted as rejected at once, `reply` is dropped unused, and the error is
    /// what the connection's `on_key_op_done` must be given.
    pub(crate) fn offer(
        &self,
        pool: &KeyOpPool,
        recorder: &CoreRecorder,
        job: KeyOpJob,
        reply: KeyOpReply,
        now: Instant,
    ) -> Result<Admitted, KeyOpFailure> {
        if self.in_flight.get() >= self.max_in_flight {
            recorder.key_op_rejected();
            return Err(KeyOpFailure::Rejected);
        }
        let deadline = now + self.deadline;
        let req = KeyOpRequest {
            job,
            deadline,
            reply,
        };
        if pool.submit(req).is_err() {
            recorder.key_op_rejected();
            return Err(KeyOpFailure::Rejected);
        }
        self.in_flight.set(self.in_flight.get() + 1);
        recorder.key_op_queued();
        Ok(Admitted {
            since: now,
            deadline,
        })
    }

    /// An admitted key operation ended with `outcome` (its answer, its deadline, or its
    /// connection closing first, `Late`): the slot is free again and the outcome and latency are
    /// counted.
    pub(crate) fn finish(
        &self,
        admitted: Admitted,
        outcome: KeyOpOutcome,
        recorder: &mut CoreRecorder,
    ) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        recorder.key_op_done(outcome, admitted.since.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::mpsc;
    use std::sync::Arc;

    use super::*;
    use crate::keyops::pool::tests::job;
    use crate::stats::CoreStats;

    fn config(queue_depth: usize, max_in_flight_per_core: usize) -> KeyOpConfig {
        KeyOpConfig {
            workers: 1,
            queue_depth,
            max_in_flight_per_core,
            deadline_ms: 60_000,
        }
    }

    /// A reply that keeps its worker until `release` is sent to, so requests stay queued.
    fn held_reply(release: &Arc<parking_lot::Mutex<mpsc::Receiver<()>>>) -> KeyOpReply {
        let release = release.clone();
        Box::new(move |_| {
            let _ = release.lock().recv();
        })
    }

    #[test]
    fn a_core_at_its_bound_is_refused_until_a_slot_is_finished() {
        let pool = KeyOpPool::start(&config(16, 2), None).expect("pool");
        let stats = Arc::new(CoreStats::default());
        let mut recorder = CoreRecorder::new(0, stats.clone());
        let gate = Admission::new(&config(16, 2));
        let now = Instant::now();
        let first = gate
            .offer(&pool, &recorder, job(), Box::new(|_| {}), now)
            .expect("first admitted");
        let _second = gate
            .offer(&pool, &recorder, job(), Box::new(|_| {}), now)
            .expect("second admitted");
        assert_eq!(gate.in_flight(), 2);
        let third = gate.offer(&pool, &recorder, job(), Box::new(|_| {}), now);
        assert!(matches!(third, Err(KeyOpFailure::Rejected)));
        assert_eq!(stats.key_ops_rejected.load(Relaxed), 1);
        assert_eq!(stats.key_ops_queued.load(Relaxed), 2);
        assert_eq!(stats.key_ops_in_flight.load(Relaxed), 2);
        assert_eq!(first.deadline(), now + Duration::from_secs(60));

        gate.finish(first, KeyOpOutcome::Ok, &mut recorder);
        assert_eq!(gate.in_flight(), 1);
        assert_eq!(stats.key_ops_ok.load(Relaxed), 1);
        assert_eq!(stats.key_ops_in_flight.load(Relaxed), 1);
        let fourth = gate.offer(&pool, &recorder, job(), Box::new(|_| {}), now);
        assert!(fourth.is_ok(), "the finished slot is free again");
    }

    #[test]
    fn a_full_pool_is_refused_at_once_and_takes_no_slot() {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release = Arc::new(parking_lot::Mutex::new(release_rx));
        // One worker, a queue of one: the first request holds the worker, the second waits in
        // the queue, the third finds it full.
        let pool = KeyOpPool::start(&config(1, 64), None).expect("pool");
        let stats = Arc::new(CoreStats::default());
        let recorder = CoreRecorder::new(0, stats.clone());
        let gate = Admission::new(&config(1, 64));
        let now = Instant::now();
        let _held = gate
            .offer(&pool, &recorder, job(), held_reply(&release), now)
            .expect("first admitted");
        // Until the worker took the first one off the queue, the queue of one is full.
        let queued = loop {
            match gate.offer(&pool, &recorder, job(), held_reply(&release), now) {
                Ok(a) => break a,
                Err(_) => std::thread::yield_now(),
            }
        };
        let refused_before = stats.key_ops_rejected.load(Relaxed);
        let full = gate.offer(&pool, &recorder, job(), Box::new(|_| {}), now);
        assert!(matches!(full, Err(KeyOpFailure::Rejected)));
        assert_eq!(stats.key_ops_rejected.load(Relaxed), refused_before + 1);
        assert_eq!(gate.in_flight(), 2, "a refused request takes no slot");
        assert_eq!(queued.deadline(), now + Duration::from_secs(60));
        drop(release_tx);
        pool.close();
    }
}
