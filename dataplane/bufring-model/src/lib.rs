//! A model of the data plane's provided-buffer ring (`dataplane/src/uring/bufring.rs`) that
//! Miri can run: the same memory layout (16-byte descriptors whose descriptor 0 holds the
//! tail in its last field), the same raw-pointer writes in `push`, the same release store in
//! `publish`, the same shared slice in `get`, and a simulated kernel that takes buffers at the
//! head (acquire load of the tail, descriptor reads and buffer writes through raw pointers) as
//! the real one does. The real ring cannot run under Miri (mmap and io_uring registration are
//! system calls); this one allocates with `std::alloc`. A change to the real ring's pointer
//! handling is mirrored here. `scripts/test.sh` runs `cargo +nightly miri test -p
//! tlsgate-bufring-model`.
#![allow(unsafe_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

/// `struct io_uring_buf`.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// Offset of the tail (`resv` of descriptor 0).
const TAIL_OFFSET: usize = 14;

/// The ring as the data plane holds it.
#[derive(Debug)]
pub struct BufRing {
    ring: NonNull<RawBuf>,
    ring_layout: Layout,
    entries: u16,
    buf_size: u32,
    memory: NonNull<u8>,
    memory_layout: Layout,
    tail: u16,
}

impl BufRing {
    /// `entries` (a power of two) buffers of `buf_size` bytes, all pushed and published.
    pub fn new(entries: u16, buf_size: u32) -> Option<BufRing> {
        Self::starting_at(entries, buf_size, 0)
    }

    /// Like `new` with the tail starting at `start` (the kernel's head must start there too):
    /// to cross the u16 wrap of the indices in a few steps.
    pub fn starting_at(entries: u16, buf_size: u32, start: u16) -> Option<BufRing> {
        if entries == 0 || !entries.is_power_of_two() || buf_size == 0 {
            return None;
        }
        let ring_layout = Layout::array::<RawBuf>(usize::from(entries)).ok()?;
        let memory_layout =
            Layout::array::<u8>(usize::from(entries).checked_mul(buf_size as usize)?).ok()?;
        // SAFETY: both layouts have a non-zero size (entries ≥ 1, buf_size ≥ 1).
        let (ring, memory) = unsafe { (alloc_zeroed(ring_layout), alloc_zeroed(memory_layout)) };
        let mut this = BufRing {
            ring: NonNull::new(ring.cast::<RawBuf>())?,
            ring_layout,
            entries,
            buf_size,
            memory: NonNull::new(memory)?,
            memory_layout,
            tail: start,
        };
        for bid in 0..entries {
            this.push(bid);
        }
        this.publish();
        Some(this)
    }

    /// As the real `get`: the first `len` bytes of buffer `bid`.
    pub fn get(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.entries {
            return &[];
        }
        let start = usize::from(bid) * self.buf_size as usize;
        let len = len.min(self.buf_size as usize);
        // SAFETY: inside the allocation (bid < entries, len ≤ buf_size); the kernel does not
        // write buffer `bid` until it is pushed back, which needs `&mut self`.
        unsafe { std::slice::from_raw_parts(self.memory.as_ptr().add(start), len) }
    }

    /// As the real `push`.
    pub fn push(&mut self, bid: u16) {
        if bid >= self.entries {
            return;
        }
        let idx = usize::from(self.tail & (self.entries - 1));
        let addr = self.memory.as_ptr() as u64 + u64::from(bid) * u64::from(self.buf_size);
        // SAFETY: idx < entries; fields written through raw pointers, `resv` (the tail in
        // descriptor 0) untouched.
        unsafe {
            let entry = self.ring.as_ptr().add(idx);
            ptr::addr_of_mut!((*entry).addr).write(addr);
            ptr::addr_of_mut!((*entry).len).write(self.buf_size);
            ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// As the real `publish`: a release store of the tail.
    pub fn publish(&mut self) {
        // SAFETY: the tail is u16-aligned inside descriptor 0.
        unsafe { tail_ptr(self.ring).store(self.tail, Ordering::Release) };
    }
}

/// The tail as an atomic, where the kernel sees it.
///
/// # Safety
/// `ring` points to a live ring of at least one descriptor.
unsafe fn tail_ptr<'a>(ring: NonNull<RawBuf>) -> &'a AtomicU16 {
    // SAFETY: per the caller; offset 14 is `resv` of descriptor 0, 2-aligned.
    unsafe {
        &*ring
            .as_ptr()
            .cast::<u8>()
            .add(TAIL_OFFSET)
            .cast::<AtomicU16>()
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts.
        unsafe {
            dealloc(self.ring.as_ptr().cast(), self.ring_layout);
            dealloc(self.memory.as_ptr(), self.memory_layout);
        }
    }
}

/// The kernel's side: takes the buffer at `head` if the published tail is past it, writes
/// `data` into it through the descriptor's address, and returns (bid, len) as a CQE would.
#[derive(Debug)]
pub struct Kernel {
    head: u16,
}

impl Kernel {
    pub fn new() -> Self {
        Kernel { head: 0 }
    }

    pub fn starting_at(head: u16) -> Self {
        Kernel { head }
    }

    /// `None` when the ring is empty (`ENOBUFS`).
    pub fn recv(&mut self, ring: &BufRing, data: &[u8]) -> Option<(u16, usize)> {
        // SAFETY: the ring is live while `ring` is borrowed; the kernel reads only descriptors
        // between head and the published tail (acquire: they were written before the store).
        unsafe {
            let tail = tail_ptr(ring.ring).load(Ordering::Acquire);
            if tail == self.head {
                return None;
            }
            let idx = usize::from(self.head & (ring.entries - 1));
            let entry = ring.ring.as_ptr().add(idx);
            let addr = ptr::addr_of!((*entry).addr).read();
            let len = ptr::addr_of!((*entry).len).read() as usize;
            let bid = ptr::addr_of!((*entry).bid).read();
            let n = data.len().min(len);
            // The kernel writes through the address it was given (exposed provenance, as a
            // device would).
            let dst = ptr::with_exposed_provenance_mut::<u8>(addr as usize);
            ptr::copy_nonoverlapping(data.as_ptr(), dst, n);
            self.head = self.head.wrapping_add(1);
            Some((bid, n))
        }
    }
}

impl Default for Kernel {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bursts that run the ring dry, buffers read and handed back out of order, indices
    /// crossing the u16 wrap: every byte read is the byte the kernel wrote, no buffer is handed
    /// out twice while held, and Miri sees no undefined behaviour.
    fn run(start: u16, rounds: usize) {
        let entries = 4u16;
        let mut ring = BufRing::starting_at(entries, 8, start).expect("ring");
        let mut kernel = Kernel::starting_at(start);
        let mut next = 0u8;
        for round in 0..rounds {
            let mut held = Vec::new();
            // A burst: one more message than there are buffers ends with ENOBUFS.
            for _ in 0..=entries {
                let msg = [next; 5];
                match kernel.recv(&ring, &msg) {
                    Some((bid, len)) => {
                        assert!(!held.iter().any(|(b, _, _)| *b == bid), "bid {bid} twice");
                        held.push((bid, len, next));
                        next = next.wrapping_add(1);
                    }
                    None => assert_eq!(held.len(), usize::from(entries), "dry only when all held"),
                }
            }
            // Consume out of order (odd rounds reversed), pushing each back after reading it.
            if round % 2 == 1 {
                held.reverse();
            }
            for (i, (bid, len, byte)) in held.into_iter().enumerate() {
                assert_eq!(ring.get(bid, len), &[byte; 5][..]);
                ring.push(bid);
                // Publish in two steps: the kernel sees only what is published.
                if i == 1 {
                    ring.publish();
                }
            }
            ring.publish();
        }
        assert!(
            ring.get(entries, 1).is_empty(),
            "an unknown bid reads nothing"
        );
    }

    #[test]
    fn from_zero() {
        run(0, 20);
    }

    #[test]
    fn across_the_u16_wrap() {
        run(u16::MAX - 6, 8);
    }

    #[test]
    fn entries_must_be_a_power_of_two() {
        assert!(BufRing::new(3, 8).is_none());
        assert!(BufRing::new(0, 8).is_none());
        assert!(BufRing::new(8, 0).is_none());
    }
}
