//! The management plane is accountable and bounded: every API request, whatever its status
//! (404, 405, 413 included), gets one audit line and a JSON error body; a unix-socket peer
//! outside the uid/gid allowlist is refused and audited; 2,000 idle connections to the metrics
//! port or the API socket neither keep a new client out nor pile up in the server; and
//! `tlsgate ctl` whose reader went away exits quietly.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{tlsgate, Lab, Serve};

const MAX_CONNECTIONS: usize = 16;
const IDLE: usize = 2000;

fn write_config(lab: &Lab, name: &str, api_extra: &str) -> Result<PathBuf> {
    let path = lab.path(&format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[pkcs11]
token = "lab"
pin = "file:{pin}"

[metrics]
listen = "127.0.0.1:0"
max_connections = {MAX_CONNECTIONS}

[dataplane]
cores = [0]
io = "portable"

[api]
socket = "{socket}"
max_connections = {MAX_CONNECTIONS}
{api_extra}

[state]
dir = "{state}"

[[listener]]
name = "web"
bind = "127.0.0.1:0"
backend = "127.0.0.1:9"
"#,
            pin = lab.p("token/user.pin"),
            socket = lab.p(&format!("{name}.sock")),
            state = lab.p(&format!("{name}-state")),
        ),
    )?;
    Ok(path)
}

/// curl over a unix socket with an optional body file: (status, body).
fn curl_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Path>,
) -> Result<(u16, String)> {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", b.display()));
    }
    let out = c.arg(format!("http://localhost{path}")).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

fn audit_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

fn error_code(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(v["error"]["code"].as_str()?.to_owned())
}

fn open_fds(pid: i32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn every_request_is_audited_with_a_json_error() -> Result<()> {
    let lab = Lab::new()?;
    let config = write_config(&lab, "a", "")?;
    let _serve = Serve::start(&lab, &config)?;
    let socket = lab.path("a.sock");
    let audit = lab.path("a-state/audit.log");
    let big = lab.path("big.json");
    std::fs::write(&big, vec![b'x'; 3 * 1024 * 1024])?;
    let import_big = lab.path("import-big.json");
    std::fs::write(
        &import_big,
        format!(
            r#"{{"label":"k","pkcs8_pem":"{}"}}"#,
            "A".repeat(100 * 1024)
        ),
    )?;
    let cases: [(&str, &str, Option<&Path>, u16, &str); 6] = [
        ("GET", "/v1/keys", None, 200, "ok"),
        ("GET", "/v1/no-such-route", None, 404, "route_not_found"),
        ("DELETE", "/v1/keys", None, 405, "method_not_allowed"),
        (
            "PUT",
            "/v1/certificates/c1",
            Some(&big),
            413,
            "body_too_large",
        ),
        (
            "POST",
            "/v1/keys/import",
            Some(&import_big),
            413,
            "body_too_large",
        ),
        ("GET", "/v1/openapi.json", None, 200, "ok"),
    ];
    let before = audit_lines(&audit)?.len();
    for (method, path, body, status, code) in cases {
        let (got, answer) = curl_unix(&socket, method, path, body)?;
        ensure!(got == status, "{method} {path}: {got} {answer}");
        if status >= 400 {
            ensure!(
                error_code(&answer).as_deref() == Some(code),
                "{method} {path}: a JSON error with code {code}, got {answer}"
            );
        }
    }
    let lines = audit_lines(&audit)?;
    ensure!(
        lines.len() - before == cases.len(),
        "one audit line per request: {} for {}:\n{lines:#?}",
        lines.len() - before,
        cases.len()
    );
    for ((method, path, _, status, code), line) in cases.iter().zip(&lines[before..]) {
        ensure!(
            line["method"] == *method
                && line["path"] == *path
                && line["status"] == *status
                && line["result"] == *code
                && line["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("uid:"))
                && line["time"].is_string()
                && line["bytes_out"].as_u64().is_some_and(|b| b > 0),
            "{method} {path}: {line}"
        );
    }
    ensure!(
        lines[before + 3]["bytes_in"] == 3 * 1024 * 1024,
        "the announced body size is recorded: {}",
        lines[before + 3]
    );
    Ok(())
}

#[test]
fn a_socket_peer_outside_the_allowlist_is_refused_and_audited() -> Result<()> {
    let lab = Lab::new()?;
    let config = write_config(&lab, "p", "socket_uids = [4242]\nsocket_gids = [4242]")?;
    let _serve = Serve::start(&lab, &config)?;
    let me = rustix::process::geteuid().as_raw();
    ensure!(me != 4242, "this test must not run as uid 4242");
    let (status, body) = curl_unix(&lab.path("p.sock"), "GET", "/v1/keys", None)?;
    ensure!(
        status == 403 && error_code(&body).as_deref() == Some("peer_not_allowed"),
        "{status} {body}"
    );
    let lines = audit_lines(&lab.path("p-state/audit.log"))?;
    let refusal = lines.last().context("an audit line for the refusal")?;
    ensure!(
        refusal["result"] == "peer_not_allowed"
            && refusal["status"] == 403
            && refusal["client"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("uid:{me} gid:"))),
        "{refusal}"
    );

    // The default allowlist (root, our uid, our group) lets us in.
    let config = write_config(&lab, "d", "")?;
    let _serve = Serve::start(&lab, &config)?;
    let (status, body) = curl_unix(&lab.path("d.sock"), "GET", "/v1/keys", None)?;
    ensure!(status == 200, "{status} {body}");
    Ok(())
}

#[test]
fn idle_connections_neither_keep_clients_out_nor_pile_up() -> Result<()> {
    let lab = Lab::new()?;
    let config = write_config(&lab, "b", "")?;
    let serve = Serve::start(&lab, &config)?;
    let ready = std::fs::read_to_string(config.with_extension("ready"))?;
    let metrics = ready
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .context("metrics address")?
        .trim()
        .to_owned();
    let fds_before = open_fds(serve.pid())?;

    let mut idle_tcp = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let s = TcpStream::connect(&metrics)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        idle_tcp.push(s);
    }
    let mut idle_unix = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let s = UnixStream::connect(lab.path("b.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        idle_unix.push(s);
    }

    // A new scraper and a new operator get their answers while the idle ones are open.
    let mut scrape = TcpStream::connect(&metrics)?;
    scrape.set_read_timeout(Some(Duration::from_secs(20)))?;
    scrape.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut text = String::new();
    scrape.read_to_string(&mut text)?;
    ensure!(
        text.starts_with("HTTP/1.1 200") && text.contains("tlsgate_"),
        "the scrape failed: {}",
        text.lines().next().unwrap_or_default()
    );
    let (status, body) = curl_unix(&lab.path("b.sock"), "GET", "/v1/keys", None)?;
    ensure!(
        status == 200,
        "the API answers a new client: {status} {body}"
    );

    // The server holds at most the bound of each, not the 4,000 connections.
    let fds = open_fds(serve.pid())?;
    ensure!(
        fds <= fds_before + 2 * MAX_CONNECTIONS + 8,
        "{fds} fds held with {IDLE} idle connections on each listener (before: {fds_before}, bound {MAX_CONNECTIONS} each)"
    );
    // The oldest idle ones were closed to make room.
    let mut buf = [0u8; 1];
    let n = idle_tcp[0].read(&mut buf)?;
    ensure!(n == 0, "the oldest idle metrics connection was closed");
    let n = idle_unix[0].read(&mut buf)?;
    ensure!(n == 0, "the oldest idle API connection was closed");
    Ok(())
}

#[test]
fn ctl_whose_reader_went_away_exits_quietly() -> Result<()> {
    let lab = Lab::new()?;
    let config = write_config(&lab, "c", "")?;
    let _serve = Serve::start(&lab, &config)?;
    for json in [false, true] {
        let mut cmd = tlsgate();
        cmd.args(["ctl", "--socket", &lab.p("c.sock")]);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .args(["listeners", "list"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // The reader goes away before ctl writes: its first write meets a broken pipe.
        drop(child.stdout.take());
        let out = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(0) && !stderr.contains("panicked"),
            "ctl (json: {json}) must exit 0 without a panic: {:?} {stderr}",
            out.status
        );
    }
    // And the shell's view: `| head -1` prints one line and no error.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} ctl --socket {} --json listeners list | head -1",
            env!("CARGO_BIN_EXE_tlsgate"),
            lab.p("c.sock")
        ))
        .output()?;
    ensure!(
        out.stdout.split(|&b| b == b'\n').count() <= 2 && out.stderr.is_empty(),
        "{:?} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
