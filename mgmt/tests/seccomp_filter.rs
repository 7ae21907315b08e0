//! The core threads' seccomp allowlist in the real binary: a core that makes a call outside the
//! list (the debug-build hook `TLSGATE_TEST_FORBIDDEN_SYSCALL=1` has it call `getppid` right
//! after its filter is in place) ends the process, and stderr names the call's number; with
//! `[process] seccomp = false` the same hook is harmless. The rest of the suite runs with the
//! filter on (the default), on both drivers: every call a serving core makes is on the list.

mod common;

use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use common::{demo_backend, drivers, tlsgate, wait_ready, ChildGuard, Lab};

fn config(lab: &Lab, io: &str, backend: &str, seccomp: bool) -> Result<std::path::PathBuf> {
    config_with(lab, io, backend, &format!("seccomp = {seccomp}"))
}

fn config_with(lab: &Lab, io: &str, backend: &str, process: &str) -> Result<std::path::PathBuf> {
    let name = format!("{io}-{}", process.replace(['\n', ' ', '"', '='], ""));
    let (key, chain) = lab.software_key_with_chain("EC", &format!("sw-{name}"))?;
    let path = lab.path(&format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[process]\n{process}\n\n[dataplane]\ncores = [0]\nio = \"{io}\"\n\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n\
             [[listener.certificate]]\nchain = \"{}\"\nkey = \"file:{}\"\n",
            chain.display(),
            key.display()
        ),
    )?;
    Ok(path)
}

#[test]
fn a_core_making_a_forbidden_call_ends_the_process_naming_the_call() -> Result<()> {
    let lab = Lab::new()?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    for io in drivers() {
        let cfg = config(&lab, io, &backend, true)?;
        let child = tlsgate()
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("TLSGATE_TEST_FORBIDDEN_SYSCALL", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut guard = ChildGuard {
            child,
            name: "tlsgate serve (seccomp = true)",
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = guard.child.try_wait()? {
                break status;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{io}: still running 30 s after a core called getppid under the filter"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut e) = guard.child.stderr.take() {
            use std::io::Read as _;
            e.read_to_string(&mut stderr)?;
        }
        let want = format!("forbidden system call: number {}", libc::SYS_getppid);
        assert!(
            stderr.contains(&want),
            "{io}: stderr lacks {want:?}: {stderr}"
        );
        assert_eq!(status.code(), Some(128 + libc::SIGSYS), "{io}: {stderr}");

        // The filter is what ended it: without it the hook's call is harmless and it serves.
        let cfg = config(&lab, io, &backend, false)?;
        let ready = cfg.with_extension("ready");
        let child = tlsgate()
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready)
            .env("TLSGATE_TEST_FORBIDDEN_SYSCALL", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut guard = ChildGuard {
            child,
            name: "tlsgate serve (seccomp = false)",
        };
        wait_ready(&ready, &mut guard, Duration::from_secs(30))?;
    }
    Ok(())
}

/// Starts `config` with `TLSGATE_TEST_FORBIDDEN_SYSCALL=hook` and waits for it to end; its exit
/// code and stderr.
fn run_to_exit(
    config: &std::path::Path,
    hook: &str,
    env_root: bool,
) -> Result<(Option<i32>, String)> {
    let mut cmd = tlsgate();
    if !env_root {
        cmd.env_remove(common::ALLOW_ROOT_ENV);
    }
    let child = cmd
        .args(["serve", "--config"])
        .arg(config)
        .env("TLSGATE_TEST_FORBIDDEN_SYSCALL", hook)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut guard = ChildGuard {
        child,
        name: "tlsgate serve (forbidden call)",
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = guard.child.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "still running 30 s after a core made a forbidden call ({hook})"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = guard.child.stderr.take() {
        use std::io::Read as _;
        e.read_to_string(&mut stderr)?;
    }
    Ok((status.code(), stderr))
}

/// The cores may make no credential call but their share of the switch to `[process] user`:
/// `setuid(0)` from a core ends the process, whether the process switches (to nobody, when run
/// as root) or not (as root with `allow_root`, where the kernel itself would let it through).
#[test]
fn a_core_calling_setuid_ends_the_process_naming_the_call() -> Result<()> {
    let lab = Lab::new()?;
    let (_backend, backend) = demo_backend(lab.dir.path())?;
    let want = format!("forbidden system call: number {}", libc::SYS_setuid);
    let mut cases = vec![(
        config_with(&lab, "portable", &backend, "seccomp = true")?,
        true,
    )];
    if rustix::process::geteuid().is_root() {
        cases.push((
            config_with(
                &lab,
                "portable",
                &backend,
                "user = \"nobody\"\ngroup = \"nogroup\"",
            )?,
            false,
        ));
    } else {
        tlsgate_hw_tests::skip::missing("the case with a switch to nobody needs root");
    }
    for (config, allow_root) in cases {
        let (code, stderr) = run_to_exit(&config, "setuid", allow_root)?;
        assert!(
            stderr.contains(&want),
            "{}: stderr lacks {want:?}: {stderr}",
            config.display()
        );
        assert_eq!(
            code,
            Some(128 + libc::SIGSYS),
            "{}: {stderr}",
            config.display()
        );
    }
    Ok(())
}
