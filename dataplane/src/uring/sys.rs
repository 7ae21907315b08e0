//! Thin libc wrappers: sockets, eventfd, CPU affinity. Every fd comes back as an `OwnedFd` so
//! it is closed exactly once.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A socket address in the kernel's layout, kept boxed by the caller while an operation that
/// points at it is in flight.
#[derive(Clone, Copy)]
pub(crate) struct RawAddr {
    pub(crate) storage: libc::sockaddr_storage,
    pub(crate) len: libc::socklen_t,
}

impl std::fmt::Debug for RawAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawAddr")
            .field("addr", &to_socket_addr(self))
            .finish()
    }
}

pub(crate) fn from_socket_addr(addr: SocketAddr) -> RawAddr {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    RawAddr {
        storage,
        len: len as libc::socklen_t,
    }
}

pub(crate) fn to_socket_addr(raw: &RawAddr) -> Option<SocketAddr> {
    match i32::from(raw.storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(&raw.storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(&raw.storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn family(addr: &SocketAddr) -> libc::c_int {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

fn stream_socket(addr: &SocketAddr, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall; a non-negative result is a fresh fd that we own.
    let fd = cvt(unsafe { libc::socket(family(addr), ty, 0) })?;
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value points at a live c_int of the length passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A listening socket with `SO_REUSEPORT`, so every core can bind the same address and the
/// kernel spreads incoming connections between them.
pub(crate) fn reuseport_listener(addr: SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    let fd = stream_socket(&addr, false)?;
    set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    // Copied to every accepted connection, as in `driver::listen`.
    set_int_opt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    if addr.is_ipv6() {
        set_int_opt(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    let raw = from_socket_addr(addr);
    // SAFETY: raw holds a valid sockaddr of raw.len bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &raw.storage as *const _ as *const libc::sockaddr,
            raw.len,
        )
    })?;
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// A nonblocking socket for an outgoing connection made by `IORING_OP_CONNECT`.
pub(crate) fn connect_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let fd = stream_socket(addr, true)?;
    set_int_opt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    Ok(fd)
}

/// Byte offset of `optlen` (a union with `splice_fd_in`/`file_index`) in `struct io_uring_sqe`.
const SQE_OPTLEN_OFFSET: usize = 44;

/// Sets `sqe->optlen` of a multishot recv: the kernel ends the receive (a completion without
/// `IORING_CQE_F_MORE`) once it has delivered `limit` bytes (Linux 6.17; older kernels refuse
/// a non-zero field with EINVAL, which [`super::probe`] checks once per ring). The `io-uring`
/// crate has no setter for it on `RecvMulti`.
pub(crate) fn with_recv_limit(
    entry: io_uring::squeue::Entry,
    limit: u32,
) -> io_uring::squeue::Entry {
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe` (the
    // transmute checks the size), a struct of integers and unions of integers with no padding,
    // built from a zeroed value: every byte is initialised, and any byte pattern is a valid sqe.
    let mut raw: [u8; 64] = unsafe { mem::transmute::<io_uring::squeue::Entry, [u8; 64]>(entry) };
    raw[SQE_OPTLEN_OFFSET..SQE_OPTLEN_OFFSET + 4].copy_from_slice(&limit.to_ne_bytes());
    // SAFETY: as above, in the other direction: 64 initialised bytes in the sqe's layout.
    unsafe { mem::transmute::<[u8; 64], io_uring::squeue::Entry>(raw) }
}

pub(crate) fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; getsockname writes at most `len` bytes.
    let mut raw = RawAddr {
        storage: unsafe { mem::zeroed() },
        len: mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
    };
    // SAFETY: storage and len are live and describe a buffer of that size.
    cvt(unsafe {
        libc::getsockname(
            fd,
            &mut raw.storage as *mut _ as *mut libc::sockaddr,
            &mut raw.len,
        )
    })?;
    to_socket_addr(&raw).ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))
}

pub(crate) fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: as in local_addr.
    let mut raw = RawAddr {
        storage: unsafe { mem::zeroed() },
        len: mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
    };
    // SAFETY: storage and len are live and describe a buffer of that size.
    cvt(unsafe {
        libc::getpeername(
            fd,
            &mut raw.storage as *mut _ as *mut libc::sockaddr,
            &mut raw.len,
        )
    })?;
    to_socket_addr(&raw).ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))
}

pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a fresh fd that we own.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: fd was just returned by eventfd(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn eventfd_signal(fd: RawFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    if n == 8 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // EAGAIN means the counter is saturated: the reader has a wake-up pending anyway.
    if err.raw_os_error() == Some(libc::EAGAIN) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(core: usize) -> io::Result<()> {
    if core >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: cpu_set_t is plain old data; CPU_ZERO/CPU_SET only touch the set we own, and the
    // index was bounds-checked above.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        cvt(libc::sched_setaffinity(
            0,
            mem::size_of::<libc::cpu_set_t>(),
            &set,
        ))?;
    }
    Ok(())
}

/// The CPUs the calling thread may run on.
pub fn current_thread_affinity() -> io::Result<Vec<usize>> {
    // SAFETY: sched_getaffinity writes into the set we own; CPU_ISSET reads it in bounds.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        cvt(libc::sched_getaffinity(
            0,
            mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        ))?;
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}
