//! A bound on the connections of the management API and the metrics endpoint.
//!
//! At most `max` connections are held. A new connection past the bound takes the place of the
//! oldest *idle* one (connected, no request in progress), which is closed: a flood of idle
//! connections can neither grow memory nor keep a new client (a scraper, an operator) out. When
//! every held connection is busy with a request, the new one is refused (closed at once).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use tokio::sync::oneshot;

/// The bound and the connections it holds.
#[derive(Debug)]
pub struct ConnLimiter {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// In order of arrival.
    held: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    busy: Arc<AtomicUsize>,
    /// Dropping it tells the connection to close.
    _evict: oneshot::Sender<()>,
}

/// One admitted connection. Dropping it frees its place.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<ConnLimiter>,
    id: u64,
    busy: Arc<AtomicUsize>,
    /// Resolves when the limiter closes this connection to make room.
    pub evicted: oneshot::Receiver<()>,
}

/// Held while a request is in progress: the connection is not idle.
#[derive(Debug)]
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnLimiter {
    pub fn new(max: usize) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            max: max.max(1),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// A place for a new connection (evicting the oldest idle one when full), or `None` when
    /// every held connection is busy.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut inner = self.inner.lock();
        if inner.held.len() >= self.max {
            let idle = inner
                .held
                .iter()
                .position(|e| e.busy.load(Ordering::Relaxed) == 0)?;
            inner.held.remove(idle);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let busy = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = oneshot::channel();
        inner.held.push(Entry {
            id,
            busy: busy.clone(),
            _evict: tx,
        });
        Some(Slot {
            limiter: self.clone(),
            id,
            busy,
            evicted: rx,
        })
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.inner.lock().held.len()
    }
}

impl Slot {
    /// Marks a request in progress until the guard drops.
    pub fn busy(&self) -> Busy {
        self.busy_handle().busy()
    }

    /// What marks the connection busy, for request handlers that outlive a borrow of the slot.
    pub fn busy_handle(&self) -> BusyHandle {
        BusyHandle(self.busy.clone())
    }
}

/// Marks its connection busy, from wherever its requests are served.
#[derive(Debug, Clone)]
pub struct BusyHandle(Arc<AtomicUsize>);

impl BusyHandle {
    pub fn busy(&self) -> Busy {
        self.0.fetch_add(1, Ordering::Relaxed);
        Busy(self.0.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.limiter.inner.lock();
        inner.held.retain(|e| e.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_bound_the_oldest_idle_connection_makes_room() {
        let l = ConnLimiter::new(2);
        let mut a = l.admit().expect("room");
        let b = l.admit().expect("room");
        let _b_busy = b.busy();
        let mut c = l.admit().expect("a evicted for c");
        assert_eq!(l.held(), 2);
        assert!(a.evicted.try_recv().is_err(), "a is told to close");
        assert!(matches!(
            c.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        let _c_busy = c.busy();
        assert!(
            l.admit().is_none(),
            "every held connection is busy: refused"
        );
        drop(c);
        assert!(l.admit().is_some(), "a place freed by a closed connection");
    }
}
