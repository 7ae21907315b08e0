//! The provided buffer ring (`IORING_REGISTER_PBUF_RING`) that multishot recv picks from.
//!
//! The kernel takes a buffer at the ring's head when data arrives and names it in the CQE; the
//! buffer is ours until we put it back at the tail. We put it back as soon as the consumer has
//! copied the bytes out, so the ring only runs dry when a burst outruns one loop turn (the
//! recv then ends with `ENOBUFS` and is re-armed).

//!
//! Both the descriptor ring and the buffers are memory the kernel reads or writes behind our
//! back, so neither is ever behind a Rust reference that claims exclusive access (`Box`, `&mut`):
//! both are raw mappings, descriptors are written field by field through raw pointers (descriptor
//! 0's last field is the ring's tail, which the kernel reads concurrently), and a buffer is read
//! through a shared slice only between the completion that hands it to us and `push`.

use std::io;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The kernel's `struct io_uring_buf` (include/uapi/linux/io_uring.h): the layout of one
/// descriptor, whose fields the `io-uring` crate keeps private. In descriptor 0, `resv` (`_resv` here) is the
/// ring's tail (`struct io_uring_buf_ring`), written only by [`BufRing::publish`].
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    _resv: u16,
}

const _: () = assert!(std::mem::size_of::<RawBuf>() == std::mem::size_of::<BufRingEntry>());
const _: () = assert!(std::mem::size_of::<RawBuf>() == 16);

#[derive(Debug)]
pub(crate) struct BufRing {
    /// Page-aligned ring of `entries` descriptors, shared with the kernel.
    ring: NonNull<BufRingEntry>,
    ring_bytes: usize,
    entries: u16,
    buf_size: u32,
    /// Backing memory of every buffer (`entries × buf_size` bytes, an anonymous mapping); never
    /// moved while registered; the kernel writes into it.
    memory: NonNull<u8>,
    memory_bytes: usize,
    /// Our copy of the tail; published to the kernel with a release store.
    tail: u16,
    pub(crate) group: u16,
}

/// An anonymous private read-write mapping of `bytes` bytes (page-aligned, zeroed).
fn map(bytes: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: anonymous private mapping, no fd; the result is checked below.
    let ptr = unsafe {
        libc::mmap(
            ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
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
        let memory_bytes = usize::from(entries)
            .checked_mul(buf_size as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // mmap gives the page alignment the kernel requires of a buffer ring.
        let ring_ptr = map(ring_bytes)?.cast::<BufRingEntry>();
        let memory = match map(memory_bytes) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: mapped just above with this length; nothing else refers to it.
                unsafe { libc::munmap(ring_ptr.as_ptr().cast(), ring_bytes) };
                return Err(e);
            }
        };
        let mut this = BufRing {
            ring: ring_ptr,
            ring_bytes,
            entries,
            buf_size,
            memory,
            memory_bytes,
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

    /// The first `len` bytes of buffer `bid`, as filled by the kernel. Call it only for a `bid`
    /// a completion named and before that buffer is [`push`](Self::push)ed back: in between,
    /// the buffer is ours and the kernel does not write it.
    pub(crate) fn get(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.entries {
            return &[];
        }
        let start = usize::from(bid) * self.buf_size as usize;
        let len = len.min(self.buf_size as usize);
        // SAFETY: `start + len` ≤ `entries × buf_size` = the mapping's length (bid < entries,
        // len ≤ buf_size). The kernel wrote these bytes before posting the completion that named
        // `bid`, and does not write buffer `bid` again until we push it back, which needs
        // `&mut self` and so ends this borrow.
        unsafe { std::slice::from_raw_parts(self.memory.as_ptr().add(start), len) }
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
        // head and the published tail, and this slot is past the published tail. The fields are
        // written through raw pointers, never a `&mut` to the descriptor: descriptor 0's `resv`
        // is the tail the kernel reads concurrently, and it is not touched here.
        unsafe {
            let entry = self.ring.as_ptr().cast::<RawBuf>().add(idx);
            ptr::addr_of_mut!((*entry).addr).write(addr);
            ptr::addr_of_mut!((*entry).len).write(self.buf_size);
            ptr::addr_of_mut!((*entry).bid).write(bid);
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
        // SAFETY: both mappings came from mmap with these lengths and nothing uses them any
        // more: the owning EventLoop dropped (and so closed) the ring before its buffer ring.
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), self.ring_bytes);
            libc::munmap(self.memory.as_ptr().cast(), self.memory_bytes);
        }
    }
}
