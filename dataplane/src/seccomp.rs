//! The seccomp allowlist of the core threads (`[process] seccomp`, on by default).
//!
//! Each core installs the filter on itself once its event loop (ring or runtime) and its
//! listening sockets are set up, right before it reports ready; threads it starts later inherit
//! it. The list is what the two drivers call while serving (measured with `strace -f -c` under
//! load, see `ARCHITECTURE.md`, "The process"): anything else is a bug or an attack, and ends
//! the process.
//!
//! Not filtered: the key-op workers (they call the PKCS#11 module, which may do anything: open
//! token files, talk to a daemon, start threads), the management thread and the tokio blocking
//! pool. With `danger_inline_key_ops` the cores sign themselves, so they are not filtered either.
//!
//! A violation: `SECCOMP_RET_TRAP` raises SIGSYS in the offending thread; the handler writes
//! `tlsgate: seccomp: a core thread made a forbidden system call: number N` to stderr (one
//! `write`, async-signal-safe) and ends the process with `_exit(159)` (128 + SIGSYS). Chosen
//! over `SECCOMP_RET_KILL_PROCESS`, which names nothing outside the kernel's audit log, so
//! that an operator and the test see which call the list lacks.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::Error;

/// The compiled filters, shared by the cores: the allowlist, and the refusal of file opens.
pub(crate) type Filter = Arc<[BpfProgram; 2]>;

/// Calls a core never needs but libraries make on their own, answered `EACCES` instead of
/// ending the process (a core opens and inspects no file): glibc's malloc opens
/// `/proc/sys/vm/overcommit_memory` once, the first time it shrinks a thread arena's heap, and
/// takes a refusal as "do not shrink by remapping"; aws-lc looks for `/dev/sysgenid` once.
/// (The allowlist lets them through; this second filter refuses them, and the kernel applies
/// the stricter answer.)
fn refused() -> Vec<libc::c_long> {
    use libc::*;
    #[cfg(target_arch = "x86_64")]
    return vec![
        SYS_openat,
        SYS_open,
        SYS_newfstatat,
        SYS_statx,
        SYS_stat,
        SYS_lstat,
        SYS_access,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_readlink,
        SYS_readlinkat,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    return vec![
        SYS_openat,
        SYS_newfstatat,
        SYS_statx,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_readlinkat,
    ];
}

/// What a core's first use of a library would otherwise do under the filter, done once on the
/// starting thread instead: aws-lc's random generator looks for `/dev/sysgenid` (VM snapshot
/// detection) the first time it runs.
pub(crate) fn warm_up() {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut seed = [0u8; 16];
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut seed);
}

/// The allowed system calls, by group (the reasons are in `ARCHITECTURE.md`).
fn allowed() -> Vec<(&'static str, Vec<libc::c_long>)> {
    use libc::*;
    vec![
        (
            "memory: the allocator and its arenas",
            vec![
                SYS_brk,
                SYS_mmap,
                SYS_munmap,
                SYS_mremap,
                SYS_madvise,
                SYS_mprotect,
            ],
        ),
        (
            "threads: locks, parking, the thread's own exit",
            vec![
                SYS_futex,
                SYS_sched_yield,
                SYS_exit,
                SYS_exit_group,
                SYS_rt_sigreturn,
                SYS_rt_sigprocmask,
                SYS_sigaltstack,
                SYS_getpid,
                SYS_gettid,
                SYS_getrandom,
            ],
        ),
        (
            "time: timers, back-off sleeps (vDSO where it can)",
            vec![
                SYS_clock_gettime,
                SYS_clock_nanosleep,
                SYS_nanosleep,
                SYS_gettimeofday,
            ],
        ),
        (
            "io_uring driver: the ring, its eventfd wake-ups",
            vec![SYS_io_uring_enter, SYS_io_uring_register],
        ),
        (
            "portable driver: epoll, its eventfd waker",
            vec![SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_ctl],
        ),
        (
            "sockets: accept, backend connect, data, shutdown, options",
            vec![
                SYS_accept4,
                SYS_socket,
                SYS_connect,
                SYS_read,
                SYS_write,
                SYS_readv,
                SYS_writev,
                SYS_recvfrom,
                SYS_sendto,
                SYS_recvmsg,
                SYS_sendmsg,
                SYS_shutdown,
                SYS_close,
                SYS_setsockopt,
                SYS_getsockopt,
                SYS_getsockname,
                SYS_getpeername,
                SYS_fcntl,
                SYS_ioctl,
            ],
        ),
    ]
}

/// The credential calls a core may make: only its share of the switch to `[process] user`
/// (uid, gid), which happens after the cores start — glibc makes every thread repeat
/// `setgroups`, `setgid` and `setuid` with the same arguments (`SIGSETXID`). So `setgroups` of
/// one group, `setgid(gid)` and `setuid(uid)`, nothing else; without a switch, none at all.
/// `capset` and the `setres*id`/`setfs*id`/`setre*id` calls are never on the list.
fn credential_rules(
    switch_to: Option<(u32, u32)>,
) -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
    use seccompiler::{SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, SeccompCondition};
    let Some((uid, gid)) = switch_to else {
        return Ok(Vec::new());
    };
    let first_arg_is = |value: u32| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            Dword,
            Eq,
            u64::from(value),
        )?])?])
    };
    Ok(vec![
        (libc::SYS_setgroups, first_arg_is(1)?),
        (libc::SYS_setgid, first_arg_is(gid)?),
        (libc::SYS_setuid, first_arg_is(uid)?),
    ])
}

/// Builds the filter for this machine's architecture; `switch_to` is the (uid, gid) the
/// process switches to after the cores start, if it does.
pub(crate) fn build(switch_to: Option<(u32, u32)>) -> Result<Filter, Error> {
    let fail = |why: String| Error::Worker {
        core: usize::MAX,
        why: format!("seccomp filter: {why}"),
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| fail(e.to_string()))?;
    let rules = |calls: Vec<libc::c_long>| -> BTreeMap<i64, Vec<SeccompRule>> {
        calls.into_iter().map(|nr| (nr, Vec::new())).collect()
    };
    let credentials = credential_rules(switch_to).map_err(|e| fail(e.to_string()))?;
    let compile = |filter: Result<SeccompFilter, seccompiler::BackendError>| {
        filter
            .and_then(BpfProgram::try_from)
            .map_err(|e| fail(e.to_string()))
    };
    let all: Vec<libc::c_long> = allowed()
        .into_iter()
        .flat_map(|(_, calls)| calls)
        .chain(refused())
        .collect();
    let mut allow = rules(all);
    allow.extend(credentials);
    let allowlist = compile(SeccompFilter::new(
        allow,
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch,
    ))?;
    let refusals = compile(SeccompFilter::new(
        rules(refused()),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    ))?;
    Ok(Arc::new([allowlist, refusals]))
}

/// Installs `filter` on the calling thread (and the SIGSYS handler, once per process).
pub(crate) fn install(core: usize, filter: &[BpfProgram; 2]) -> Result<(), Error> {
    sigsys::install_handler().map_err(|e| Error::Worker {
        core,
        why: format!("seccomp: SIGSYS handler: {e}"),
    })?;
    // The refusals first: installing a filter makes calls (`prctl`, `seccomp`) that the
    // allowlist, once in place, would not let through.
    for program in filter.iter().rev() {
        seccompiler::apply_filter(program).map_err(|e| Error::Worker {
            core,
            why: format!(
                "seccomp: cannot install the filter ([process] seccomp = false turns it off): {e}"
            ),
        })?;
    }
    Ok(())
}

/// Tests only (debug builds; the release binary has no such hook): with
/// `TLSGATE_TEST_FORBIDDEN_SYSCALL=1` a core makes a call outside the list (`getppid`) right
/// after its set-up, where its filter (if any) is in place; with `=setuid` it calls
/// `setuid(0)` on itself alone (the raw call, not glibc's every-thread one).
#[cfg(debug_assertions)]
pub(crate) fn test_hook() {
    match std::env::var("TLSGATE_TEST_FORBIDDEN_SYSCALL").as_deref() {
        Ok("1") => {
            let _ = rustix::process::getppid();
        }
        Ok("setuid") => {
            let _ = rustix::thread::set_thread_uid(rustix::process::Uid::ROOT);
        }
        _ => {}
    }
}

/// The SIGSYS handler: the only `unsafe` outside the io_uring module (installing a signal
/// handler and reading the kernel's `siginfo` have no safe API).
#[allow(unsafe_code)]
mod sigsys {
    use std::sync::OnceLock;

    /// Offset of `si_syscall` in a 64-bit Linux `siginfo_t` whose `si_code` is `SYS_SECCOMP`:
    /// three ints and padding (16 bytes), then `_sigsys { void *_call_addr; int _syscall; }`.
    const SI_SYSCALL_OFFSET: usize = 24;
    const PREFIX: &[u8] = b"tlsgate: seccomp: a core thread made a forbidden system call: number ";

    // Process-wide by nature: a signal handler belongs to the process.
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

    pub(super) fn install_handler() -> Result<(), String> {
        INSTALLED
            .get_or_init(|| {
                // SAFETY: a zeroed `sigaction` is a valid starting value (empty mask, no flags);
                // the handler has the three-argument signature SA_SIGINFO asks for and stays
                // valid for the life of the process (a plain function).
                let rc = unsafe {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = on_sigsys as *const () as usize;
                    action.sa_flags = libc::SA_SIGINFO;
                    libc::sigemptyset(&mut action.sa_mask);
                    libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
                };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error().to_string())
                }
            })
            .clone()
    }

    /// Writes the message with the call's number and ends the process. Async-signal-safe: no
    /// allocation, no lock, only `write` and `_exit` (both on the allowlist).
    extern "C" fn on_sigsys(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        let nr = if info.is_null() {
            -1
        } else {
            // SAFETY: the kernel hands a SA_SIGINFO handler a valid `siginfo_t`; for a seccomp
            // SIGSYS its union holds `_sigsys`, whose `_syscall` is an int at this offset on
            // the 64-bit targets seccompiler supports (x86_64, aarch64, riscv64).
            unsafe {
                info.cast::<u8>()
                    .add(SI_SYSCALL_OFFSET)
                    .cast::<libc::c_int>()
                    .read_unaligned()
            }
        };
        let mut buf = [0u8; 128];
        let mut len = PREFIX.len();
        buf[..len].copy_from_slice(PREFIX);
        len += format_int(nr, &mut buf[len..]);
        let tail = b" (see [process] seccomp)\n";
        buf[len..len + tail.len()].copy_from_slice(tail);
        len += tail.len();
        // SAFETY: `buf[..len]` is initialised memory of this frame; `write` and `_exit` are
        // async-signal-safe.
        unsafe {
            libc::write(2, buf.as_ptr().cast(), len);
            libc::_exit(128 + libc::SIGSYS);
        }
    }

    /// Decimal digits of `n` into `out`; returns how many bytes.
    fn format_int(n: libc::c_int, out: &mut [u8]) -> usize {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let neg = n < 0;
        let mut v = i64::from(n).unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let mut len = 0;
        if neg {
            out[0] = b'-';
            len = 1;
        }
        let d = &digits[i..];
        out[len..len + d.len()].copy_from_slice(d);
        len + d.len()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn numbers_format_as_decimal() {
            for (n, want) in [(0, "0"), (110, "110"), (-1, "-1"), (i32::MAX, "2147483647")] {
                let mut out = [0u8; 16];
                let len = super::format_int(n, &mut out);
                assert_eq!(&out[..len], want.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_filtered_thread_is_refused_file_opens_and_keeps_its_allowed_calls() {
        let filter = super::build(None).expect("filter");
        let got = std::thread::spawn(move || {
            super::install(0, &filter).expect("install");
            let open = std::fs::File::open("/proc/self/status").map(|_| ());
            let time = std::time::SystemTime::now();
            let alloc = vec![1u8; 1 << 20].len();
            (open.map_err(|e| e.kind()), time, alloc)
        })
        .join()
        .expect("thread");
        assert_eq!(got.0, Err(std::io::ErrorKind::PermissionDenied));
        assert_eq!(got.2, 1 << 20);
        // This thread has no filter.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }

    #[test]
    fn the_filter_builds_for_this_machine() {
        let f = super::build(None).expect("filter");
        assert!(f[0].len() > 40, "one jump per allowed call: {}", f[0].len());
    }

    /// The credential calls of the switch the filter was built for pass (a mismatch ends the
    /// process: `mgmt/tests/seccomp_filter.rs` shows that from outside).
    #[test]
    fn a_filtered_thread_may_repeat_the_switch_it_was_built_for() {
        let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
        let filter = super::build(Some((uid.as_raw(), gid.as_raw()))).expect("filter");
        let got = std::thread::spawn(move || {
            super::install(0, &filter).expect("install");
            (
                rustix::thread::set_thread_gid(gid).is_ok(),
                rustix::thread::set_thread_uid(uid).is_ok(),
            )
        })
        .join()
        .expect("thread");
        assert_eq!(got, (true, true));
    }
}
