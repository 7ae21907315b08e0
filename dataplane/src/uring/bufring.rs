//! The provided buffer ring (`IORING_REGISTER_PBUF_RING`) that multishot recv picks from.
//!
//! The kernel takes a buffer at the ring's head when data arrives and names it in the CQE; the
//! buffer is ours until we put it back at the tail. We put it back as soon as the consumer has
//! copied the bytes out, so the ring only runs dry when a burst outruns one loop turn (the
//! recv then ends with `ENOBUFS` and is re-armed).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

#[derive(Debug)]
pub(crate) struct BufRing {
    /// Page-aligned ring of `entries` descriptors, shared with the kernel.
    ring: NonNull<BufRingEntry>,
    ring_bytes: usize,
    entries: u16,
    buf_size: u32,
    /// Backing memory of every buffer; never reallocated while registered.
    memory: Box<[u8]>,
    /// Our copy of the tail; published to the kernel with a release store.
    tail: u16,
    pub(crate) group: u16,
}

impl BufRing {
    /// Registers `entries` buffers of `buf_size` bytes as group `group`. `entries` must be a
    /// power of two (kernel rule), at most 32768.
    pub(crate) fn register(
        ring: &IoUring,
        group: u16,
        entries: u16,
        buf_size: u32,
    ) -> io::Result<BufRing> {
        if entries == 0 || !entries.is_power_of_two() || entries > 32768 || buf_size == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let ring_bytes = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: anonymous private mapping, no fd; the result is checked below. mmap gives the
        // page alignment the kernel requires of a buffer ring.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let Some(ring_ptr) = NonNull::new(ptr.cast::<BufRingEntry>()) else {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        let memory = vec![0u8; usize::from(entries) * buf_size as usize].into_boxed_slice();
        let mut this = BufRing {
            ring: ring_ptr,
            ring_bytes,
            entries,
            buf_size,
            memory,
            tail: 0,
            group,
        };
        // SAFETY: the mapping is page-aligned, `entries` descriptors long, and lives until
        // Drop, which runs after the ring is gone (EventLoop drops its ring first) or after
        // unregistering.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                ring_ptr.as_ptr() as u64,
                entries,
                group,
                0,
            )?;
        }
        for bid in 0..entries {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    /// The first `len` bytes of buffer `bid`, as filled by the kernel.
    pub(crate) fn get(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.buf_size as usize;
        let len = len.min(self.buf_size as usize);
        self.memory.get(start..start + len).unwrap_or(&[])
    }

    /// Puts buffer `bid` back; visible to the kernel after `publish`.
    pub(crate) fn push(&mut self, bid: u16) {
        if bid >= self.entries {
            return;
        }
        let mask = self.entries - 1;
        let idx = usize::from(self.tail & mask);
        let addr = self.memory.as_ptr() as u64 + u64::from(bid) * u64::from(self.buf_size);
        // SAFETY: idx < entries, inside the mapping; the kernel only reads descriptors between
        // head and the published tail, and this slot is past the published tail.
        unsafe {
            let entry = &mut *self.ring.as_ptr().add(idx);
            entry.set_addr(addr);
            entry.set_len(self.buf_size);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    pub(crate) fn publish(&mut self) {
        // SAFETY: the tail field lives in descriptor 0 of our mapping, is u16-aligned, and the
        // kernel reads it concurrently, hence the atomic release store that orders the
        // descriptor writes before it.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping came from mmap with this length and nothing uses it any more:
        // the owning EventLoop dropped (and so closed) the ring before its buffer ring.
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), self.ring_bytes);
        }
    }
}
