//! Start-up checks: can this process use io_uring, and which features does the kernel offer.

use std::fmt;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use io_uring::{cqueue, opcode, types, IoUring, Probe};

use super::bufring::BufRing;
use super::sys::with_recv_limit;

/// Path of the sysctl that switches io_uring off system-wide (Linux 6.6+).
const DISABLED_SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Why the io_uring driver cannot run here; the portable driver takes over and logs this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// `kernel.io_uring_disabled = 2`: nobody may create rings.
    DisabledBySysctl,
    /// `kernel.io_uring_disabled = 1` and this process is not in `kernel.io_uring_group`.
    RestrictedBySysctl,
    /// `io_uring_setup` answered EPERM with the sysctl open: a seccomp profile (Docker's
    /// default one, for instance) or an LSM refuses the syscall.
    PermissionDenied,
    /// `io_uring_setup` answered ENOSYS: the kernel has no io_uring (too old or built without).
    NotImplemented,
    /// The kernel has io_uring but lacks a feature this driver requires.
    MissingFeature(&'static str),
    /// Ring set-up failed for another reason (memory limits, for instance).
    SetupFailed(String),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::DisabledBySysctl => {
                write!(f, "io_uring is disabled by sysctl kernel.io_uring_disabled=2")
            }
            Unavailable::RestrictedBySysctl => write!(
                f,
                "io_uring is restricted by sysctl kernel.io_uring_disabled=1 and this process is not in kernel.io_uring_group"
            ),
            Unavailable::PermissionDenied => write!(
                f,
                "io_uring_setup returned EPERM (a seccomp profile or security module blocks io_uring)"
            ),
            Unavailable::NotImplemented => {
                write!(f, "io_uring_setup returned ENOSYS (kernel without io_uring)")
            }
            Unavailable::MissingFeature(what) => write!(f, "the kernel lacks {what}"),
            Unavailable::SetupFailed(err) => write!(f, "io_uring set-up failed: {err}"),
        }
    }
}

/// What the kernel offers, logged at start-up so an operator can see what the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// Required: multishot accept (5.19).
    pub accept_multishot: bool,
    /// Required: multishot recv with a provided buffer ring (6.0).
    pub recv_multishot: bool,
    /// Required: provided buffer rings (5.19), checked by registering one.
    pub buf_ring: bool,
    /// Optional: `IORING_OP_MSG_RING` for cross-ring wake-ups (5.18).
    pub msg_ring: bool,
    /// Optional: `IORING_FEAT_FAST_POLL` (5.7): sockets are polled internally, no io-wq thread.
    pub fast_poll: bool,
    /// Optional: `IORING_SETUP_SINGLE_ISSUER`/`DEFER_TASKRUN` (6.1).
    pub defer_taskrun: bool,
    /// Optional: a byte limit on a multishot recv (6.17), checked by arming one. Without it a
    /// receive resumed after backpressure is single-shot (one buffer per turn: bounded, but
    /// more turns per byte).
    pub recv_limit: bool,
}

impl Features {
    /// The first required feature that is missing.
    pub fn missing_required(&self) -> Option<&'static str> {
        if !self.accept_multishot {
            Some("multishot accept (Linux 5.19)")
        } else if !self.buf_ring {
            Some("provided buffer rings (Linux 5.19)")
        } else if !self.recv_multishot {
            Some("multishot recv (Linux 6.0)")
        } else {
            None
        }
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "multishot accept: {}, multishot recv: {}, provided buffer ring: {}, msg_ring: {}, fast poll: {}, defer taskrun: {}, multishot recv byte limit: {}",
            yes(self.accept_multishot),
            yes(self.recv_multishot),
            yes(self.buf_ring),
            yes(self.msg_ring),
            yes(self.fast_poll),
            yes(self.defer_taskrun),
            yes(self.recv_limit),
        )
    }
}

/// Probes an existing ring. Multishot variants share their opcode with the one-shot ones, so
/// their presence is inferred from an opcode of the same kernel release: `IORING_OP_SOCKET`
/// (5.19, with multishot accept) and `IORING_OP_SEND_ZC` (6.0, with multishot recv).
pub(crate) fn probe_ring(ring: &IoUring) -> io::Result<Features> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let params = ring.params();
    let base = [
        opcode::Accept::CODE,
        opcode::Recv::CODE,
        opcode::Send::CODE,
        opcode::Connect::CODE,
        opcode::Close::CODE,
        opcode::Timeout::CODE,
        opcode::LinkTimeout::CODE,
        opcode::Read::CODE,
        opcode::AsyncCancel::CODE,
    ]
    .iter()
    .all(|&op| probe.is_supported(op));
    Ok(Features {
        accept_multishot: base && probe.is_supported(opcode::Socket::CODE),
        recv_multishot: base && probe.is_supported(opcode::SendZc::CODE),
        // Confirmed by the caller when it registers its buffer ring.
        buf_ring: probe.is_supported(opcode::Socket::CODE),
        msg_ring: probe.is_supported(opcode::MsgRingData::CODE),
        fast_poll: params.is_feature_fast_poll(),
        defer_taskrun: probe.is_supported(opcode::SendZc::CODE),
        // Confirmed by the caller with `probe_recv_limit` once its buffer ring is registered.
        recv_limit: false,
    })
}

/// `user_data` of the probe's operations; the loop's own keys never reach it.
const PROBE_USER_DATA: u64 = u64::MAX - 1;

/// Whether the kernel honours a byte limit on a multishot recv: arms one with a 1-byte limit
/// on a socket pair holding one byte, on a ring with nothing else in flight. A kernel that
/// knows the limit ends the receive after that byte (no `IORING_CQE_F_MORE`); an older one
/// refuses the field (EINVAL). Anything else counts as no; the buffer the probe used goes back.
pub(crate) fn probe_recv_limit(ring: &mut IoUring, bufs: &mut BufRing) -> bool {
    let Ok((a, mut b)) = UnixStream::pair() else {
        return false;
    };
    if b.write_all(&[0]).is_err() {
        return false;
    }
    let entry = with_recv_limit(
        opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), bufs.group).build(),
        1,
    )
    .user_data(PROBE_USER_DATA);
    // SAFETY: the entry points at no memory of ours; the fd it names stays open until every
    // completion for it has been reaped below (or the receive cancelled).
    if unsafe { ring.submission().push(&entry) }.is_err() {
        return false;
    }
    // (result, more) of the receive's first completion.
    let mut first = None;
    let mut armed = true;
    let mut cancelled = false;
    for _ in 0..4 {
        if !armed || ring.submit_and_wait(1).is_err() {
            break;
        }
        for cqe in ring.completion() {
            if cqe.user_data() != PROBE_USER_DATA {
                continue;
            }
            if let Some(bid) = cqueue::buffer_select(cqe.flags()) {
                bufs.push(bid);
                bufs.publish();
            }
            armed = cqueue::more(cqe.flags());
            first.get_or_insert((cqe.result(), armed));
        }
        if armed && !cancelled {
            // The limit was not honoured: cancel the receive before its socket closes.
            let cancel = opcode::AsyncCancel::new(PROBE_USER_DATA)
                .build()
                .user_data(PROBE_USER_DATA - 1);
            // SAFETY: a cancel names no memory.
            cancelled = unsafe { ring.submission().push(&cancel) }.is_ok();
        }
    }
    // Reap the cancel's own completion, if any, so the loop never sees it.
    let _ = ring.completion().count();
    first == Some((1, false))
}

/// Maps the sysctl value and the outcome of `io_uring_setup` to a reason, or `None` when
/// io_uring can be used. Split out so every branch is testable on a kernel that allows io_uring.
pub fn classify(sysctl: Option<u8>, setup: Result<(), &io::Error>) -> Option<Unavailable> {
    let err = match setup {
        Ok(()) => return None,
        Err(err) => err,
    };
    match (err.raw_os_error(), sysctl) {
        (Some(libc::EPERM), Some(2)) => Some(Unavailable::DisabledBySysctl),
        (Some(libc::EPERM), Some(1)) => Some(Unavailable::RestrictedBySysctl),
        (Some(libc::EPERM), _) => Some(Unavailable::PermissionDenied),
        (Some(libc::ENOSYS), _) => Some(Unavailable::NotImplemented),
        _ => Some(Unavailable::SetupFailed(err.to_string())),
    }
}

fn read_sysctl() -> Option<u8> {
    std::fs::read_to_string(DISABLED_SYSCTL)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Tries io_uring the way the driver will use it: a ring, the probe and a buffer ring.
/// `Ok` carries the features to log; `Err` says why the portable driver must run instead.
///
/// The trial ring is made on a short-lived thread of its own: a thread that ever created a
/// ring is sent task work (`TWA_SIGNAL`) when the kernel tears that ring down, which makes a
/// blocking socket call of that thread with a timeout fail with EINTR much later. The caller
/// (often the process's main thread) must stay clear of that.
pub fn check_available() -> Result<Features, Unavailable> {
    std::thread::Builder::new()
        .name("tlsgate-uring-probe".into())
        .spawn(check_available_here)
        .map_err(|e| Unavailable::SetupFailed(format!("probe thread: {e}")))?
        .join()
        .unwrap_or_else(|_| Err(Unavailable::SetupFailed("probe thread panicked".into())))
}

fn check_available_here() -> Result<Features, Unavailable> {
    let sysctl = read_sysctl();
    let mut ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(err) => {
            return Err(classify(sysctl, Err(&err))
                .unwrap_or_else(|| Unavailable::SetupFailed(err.to_string())))
        }
    };
    let mut features =
        probe_ring(&ring).map_err(|e| Unavailable::SetupFailed(format!("probe: {e}")))?;
    features.buf_ring = match super::bufring::BufRing::register(&ring, 0, 2, 64) {
        Ok(mut bufs) => {
            features.recv_limit = probe_recv_limit(&mut ring, &mut bufs);
            let _ = ring.submitter().unregister_buf_ring(bufs.group);
            true
        }
        Err(_) => false,
    };
    match features.missing_required() {
        Some(what) => Err(Unavailable::MissingFeature(what)),
        None => Ok(features),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn classify_names_every_reason() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        let enomem = io::Error::from_raw_os_error(libc::ENOMEM);
        assert_eq!(classify(Some(0), Ok(())), None);
        assert_eq!(
            classify(Some(2), Err(&eperm)),
            Some(Unavailable::DisabledBySysctl)
        );
        assert_eq!(
            classify(Some(1), Err(&eperm)),
            Some(Unavailable::RestrictedBySysctl)
        );
        assert_eq!(
            classify(Some(0), Err(&eperm)),
            Some(Unavailable::PermissionDenied)
        );
        assert_eq!(
            classify(None, Err(&eperm)),
            Some(Unavailable::PermissionDenied)
        );
        assert_eq!(
            classify(None, Err(&enosys)),
            Some(Unavailable::NotImplemented)
        );
        assert!(matches!(
            classify(Some(0), Err(&enomem)),
            Some(Unavailable::SetupFailed(_))
        ));
        assert!(Unavailable::PermissionDenied
            .to_string()
            .contains("seccomp"));
    }

    /// Installs, on the calling thread only, a seccomp filter that fails syscall `nr` with
    /// `errno` (what Docker's default profile does to `io_uring_setup` with EPERM). Threads the
    /// caller spawns afterwards inherit it; the rest of the test process is untouched.
    pub(crate) fn refuse_syscall_on_this_thread(nr: libc::c_long, errno: u32) -> io::Result<()> {
        const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
        const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
        let nr = nr as u32;
        let filter = [
            // A = seccomp_data.nr
            libc::sock_filter {
                code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                jt: 0,
                jf: 0,
                k: 0,
            },
            libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: nr,
            },
            libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: SECCOMP_RET_ERRNO | errno,
            },
            libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: SECCOMP_RET_ALLOW,
            },
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: plain prctl calls; `prog` and `filter` outlive the call, which copies them.
        // Without SECCOMP_FILTER_FLAG_TSYNC the filter binds this thread (and threads it
        // spawns) only, so the rest of the test process is untouched.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Runs `f` on a fresh thread whose `io_uring_setup` fails with `errno`; `None` (a skip, or
    /// a failure under CI) when this sandbox refuses new seccomp filters.
    fn with_io_uring_refused<T: Send + 'static>(
        errno: i32,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let got = std::thread::spawn(move || {
            refuse_syscall_on_this_thread(libc::SYS_io_uring_setup, errno as u32).map(|()| f())
        })
        .join()
        .expect("the filter thread does not panic");
        match got {
            Ok(v) => Some(v),
            Err(e) => {
                tlsgate_hw_tests::skip::missing(format!("cannot install a seccomp filter: {e}"));
                None
            }
        }
    }

    fn empty_snapshot() -> std::sync::Arc<crate::Snapshot> {
        std::sync::Arc::new(crate::Snapshot {
            listeners: Vec::new(),
        })
    }

    /// A sandbox that refuses io_uring (Docker's default seccomp profile answers EPERM, older
    /// ones ENOSYS): the probe names the cause, `io = "uring"` refuses to start with that reason,
    /// and `io = "auto"` runs the portable driver instead.
    #[test]
    fn a_seccomp_profile_that_refuses_io_uring_is_named_and_auto_falls_back() {
        if !tlsgate_hw_tests::skip::unless(tlsgate_hw_tests::skip::io_uring_sysctl_off()) {
            return;
        }
        for (errno, want) in [
            (libc::EPERM, Unavailable::PermissionDenied),
            (libc::ENOSYS, Unavailable::NotImplemented),
        ] {
            let Some((probe, uring, auto)) = with_io_uring_refused(errno, || {
                let mut cfg = crate::DataplaneConfig::new(vec![0]);
                cfg.io = crate::IoDriver::Uring;
                let uring = crate::start(cfg.clone(), empty_snapshot()).map(|dp| dp.driver());
                cfg.io = crate::IoDriver::Auto;
                let auto = crate::start(cfg, empty_snapshot()).map(|dp| {
                    let kind = dp.driver();
                    let _ = dp.shutdown(std::time::Duration::ZERO);
                    kind
                });
                (check_available(), uring, auto)
            }) else {
                return;
            };
            assert_eq!(probe, Err(want.clone()), "errno {errno}");
            match uring {
                Err(crate::Error::UringUnavailable { why }) => {
                    assert_eq!(why, want.to_string(), "errno {errno}")
                }
                other => panic!("io = uring under a refusing sandbox started: {other:?}"),
            }
            assert_eq!(
                auto.expect("auto starts"),
                crate::IoDriverKind::Portable,
                "errno {errno}"
            );
        }
        // The same configuration without the filter runs io_uring: the filter made the difference.
        let mut cfg = crate::DataplaneConfig::new(vec![0]);
        cfg.io = crate::IoDriver::Auto;
        let dp = crate::start(cfg, empty_snapshot()).expect("start");
        assert_eq!(dp.driver(), crate::IoDriverKind::Uring);
        dp.shutdown(std::time::Duration::ZERO).expect("shutdown");
    }

    #[test]
    fn this_kernel_agrees_with_its_sysctl() {
        match (read_sysctl(), check_available()) {
            (Some(0), Ok(features)) => assert_eq!(features.missing_required(), None),
            (Some(2), Err(reason)) => assert_eq!(reason, Unavailable::DisabledBySysctl),
            (sysctl, result) => {
                // Some other environment (seccomp, old kernel): the answer must still name a
                // reason rather than claim success with a missing feature.
                if let Ok(f) = &result {
                    assert_eq!(f.missing_required(), None);
                }
                eprintln!("io_uring here: sysctl {sysctl:?}, {result:?}");
            }
        }
    }
}
