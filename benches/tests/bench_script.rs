//! `scripts/bench-tlsgate.sh` end to end: a real server (`openssl s_server`) pinned to CPU 0,
//! the real generator pinned to CPU 1, the table and the raw JSON results.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

#[test]
fn bench_script_prints_the_machine_and_one_row_per_run() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        tlsgate_hw_tests::skip::missing(format!(
            "the script pins server and generator to two CPUs; this machine has {cpus}"
        ));
        return;
    }
    for (tool, package) in [("openssl", "openssl"), ("taskset", "util-linux")] {
        if !tlsgate_hw_tests::skip::unless(tlsgate_hw_tests::skip::tool_missing(tool, package)) {
            return;
        }
    }
    let pki = support::pki();
    // The script needs the port before the server starts; the kernel picks a free one.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let target = format!("127.0.0.1:{port}");
    let out = tempfile::tempdir().expect("temp dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench-tlsgate.sh");
    let run = Command::new("bash")
        .arg(&script)
        .args(["--load", env!("CARGO_BIN_EXE_tlsgate-load")])
        .arg("--ca")
        .arg(&pki.ca_pem)
        .args([
            "--target",
            &target,
            "--label",
            "s_server",
            "--concurrency",
            "1",
        ])
        .args([
            "--connections",
            "40",
            "--duration",
            "30",
            "--modes",
            "full resume",
        ])
        .args(["--tls", "1.3 1.2"])
        .arg("--out")
        .arg(out.path())
        .args([
            "--", "openssl", "s_server", "-quiet", "-www", "-accept", &target,
        ])
        .arg("-cert")
        .arg(pki.dir.path().join("leaf.pem"))
        .arg("-key")
        .arg(pki.dir.path().join("leaf.key"))
        .output()
        .expect("run bench-tlsgate.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "script failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("# machine") && stdout.contains("kernel"),
        "{stdout}"
    );
    for (mode, tls) in [
        ("full", "1.3"),
        ("resume", "1.3"),
        ("full", "1.2"),
        ("resume", "1.2"),
    ] {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([mode, tls]))
            .unwrap_or_else(|| panic!("no {mode} {tls} row in\n{stdout}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[4], "40", "ok column of {row}");
        assert_eq!(cols[5], "0", "errors column of {row}");
        let json = out.path().join(format!("s_server-{mode}-tls{tls}.json"));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("raw result kept"))
                .expect("JSON");
        assert!(
            report["server"]["cpu_us"].is_u64(),
            "server CPU sampled: {report:#}"
        );
    }
}
