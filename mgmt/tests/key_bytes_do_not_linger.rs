//! A key imported through the management API leaves no copy of itself in the serving process:
//! after importing a good key, a malformed one and one the token refuses, a core of the process
//! (`gcore`, with `[process] danger_allow_core_dumps = true`) holds none of their secret scalars,
//! PKCS#8 DER or base64 lines, nor the PIN. And by default the process cannot write a core file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::{check, require, Lab, Serve};

/// Distinctive and held for the process's life: proves the core search finds what is there.
const PROBE_LISTENER: &str = "linger-probe-listener-5d1e83";

fn shim_path() -> Result<PathBuf> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tlsgate"));
    let shim = bin
        .parent()
        .context("binary directory")?
        .join("libtlsgate_pkcs11_shim.so");
    ensure!(
        shim.exists(),
        "{} is missing: run `cargo build -p tlsgate-pkcs11-shim` first",
        shim.display()
    );
    Ok(shim)
}

/// One test key: its PEM, PKCS#8 DER, secret scalar and the base64 lines of the PEM.
struct TestKey {
    pem: String,
    der: Vec<u8>,
    scalar: Vec<u8>,
}

impl TestKey {
    fn new(dir: &Path, name: &str) -> Result<TestKey> {
        let pem_path = dir.join(format!("{name}.pem"));
        check(
            Command::new("openssl")
                .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
                .args(["ec_paramgen_curve:P-256", "-out"])
                .arg(&pem_path)
                .output()?,
            "openssl genpkey",
        )?;
        let out = Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
            .arg(&pem_path)
            .output()?;
        ensure!(out.status.success(), "openssl pkcs8 failed");
        let der = out.stdout;
        // ECPrivateKey: SEQUENCE { INTEGER 1, OCTET STRING (32) d, ... }
        let at = der
            .windows(5)
            .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
            .context("ECPrivateKey scalar in the DER")?
            + 5;
        let scalar = der[at..at + 32].to_vec();
        let pem = std::fs::read_to_string(&pem_path)?;
        std::fs::remove_file(&pem_path)?;
        Ok(TestKey { pem, der, scalar })
    }

    /// A PEM of this key with its public point damaged: the scalar is intact, the key is not.
    fn malformed_pem(&self) -> String {
        let mut der = self.der.clone();
        if let Some(last) = der.last_mut() {
            *last ^= 0x01;
        }
        pem_of(&der)
    }

    /// What must not be found in the core for a key whose PEM was `pem`.
    fn needles(&self, pem: &str) -> Vec<(String, Vec<u8>)> {
        let mut v = vec![
            ("scalar".to_owned(), self.scalar.clone()),
            ("der".to_owned(), self.der.clone()),
        ];
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            // Lines of at least 24 base64 characters: too long to occur by chance.
            if line.len() >= 24 {
                v.push((format!("base64 line {line}"), line.as_bytes().to_vec()));
            }
        }
        v
    }
}

fn pem_of(der: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for c in der.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let v = [
            b[0] >> 2,
            (b[0] & 3) << 4 | b[1] >> 4,
            (b[1] & 15) << 2 | b[2] >> 6,
            b[2] & 63,
        ];
        for (i, x) in v.iter().enumerate() {
            b64.push(if i <= c.len() {
                A[*x as usize] as char
            } else {
                '='
            });
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

fn write_config(lab: &Lab, allow_dumps: bool, control: &Path) -> Result<PathBuf> {
    let _ = control;
    let path = lab.path(if allow_dumps {
        "dumps.toml"
    } else {
        "default.toml"
    });
    let process = if allow_dumps {
        "[process]\ndanger_allow_core_dumps = true\n"
    } else {
        ""
    };
    std::fs::write(
        &path,
        format!(
            r#"{process}
[pkcs11]
module = "{shim}"
token = "lab"
pin = "file:{pin}"

[dataplane]
cores = [0]
io = "portable"

[api]
socket = "{socket}"

[state]
dir = "{state}"

[[listener]]
name = "{PROBE_LISTENER}"
bind = "127.0.0.1:0"
backend = "127.0.0.1:9"
"#,
            shim = shim_path()?.display(),
            pin = lab.p("token/user.pin"),
            socket = lab.p("api.sock"),
            state = lab.p("state"),
        ),
    )?;
    Ok(path)
}

fn start(lab: &Lab, allow_dumps: bool) -> Result<(Serve, PathBuf)> {
    let control = lab.path("shim.control");
    std::fs::write(&control, "")?;
    let config = write_config(lab, allow_dumps, &control)?;
    let serve = Serve::start_with_env(
        lab,
        &config,
        &[
            ("TLSGATE_SHIM_CONTROL", control.display().to_string()),
            (
                "TLSGATE_SHIM_MODULE",
                "/usr/lib/softhsm/libsofthsm2.so".to_owned(),
            ),
        ],
    )?;
    Ok((serve, control))
}

/// Replaces the shim's control file in one step.
fn set_faults(control: &Path, directives: &str) -> Result<()> {
    let tmp = control.with_extension("tmp");
    std::fs::write(&tmp, directives)?;
    std::fs::rename(&tmp, control)?;
    Ok(())
}

/// `POST /v1/keys/import` over the unix socket with the body in a file: (status, body).
fn import(lab: &Lab, label: &str, pem: &str) -> Result<(u16, String)> {
    let body = serde_json::json!({ "label": label, "pkcs8_pem": pem }).to_string();
    let file = lab.path(&format!("{label}.json"));
    std::fs::write(&file, body)?;
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--unix-socket",
            &lab.p("api.sock"),
        ])
        .args(["-X", "POST", "-w", "\n%{http_code}"])
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg("http://localhost/v1/keys/import")
        .output()?;
    std::fs::remove_file(&file)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    let Some(&first) = needle.first() else {
        return 0;
    };
    let mut n = 0;
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        match haystack[i..=haystack.len() - needle.len()]
            .iter()
            .position(|&b| b == first)
        {
            Some(p) => {
                i += p;
                if haystack[i..i + needle.len()] == *needle {
                    n += 1;
                }
                i += 1;
            }
            None => break,
        }
    }
    n
}

fn gcore(lab: &Lab, pid: i32) -> Result<Vec<u8>> {
    let prefix = lab.path("core");
    let out = Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .output()?;
    let file = PathBuf::from(format!("{}.{pid}", prefix.display()));
    ensure!(
        file.exists(),
        "gcore wrote no core: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let core = std::fs::read(&file)?;
    std::fs::remove_file(&file)?;
    Ok(core)
}

#[test]
fn imported_keys_and_the_pin_are_not_in_a_core_dump() -> Result<()> {
    if !require("gcore", "gdb") || !require("openssl", "openssl") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let (serve, control) = start(&lab, true)?;
    let keys = (
        TestKey::new(lab.dir.path(), "good")?,
        TestKey::new(lab.dir.path(), "malformed")?,
        TestKey::new(lab.dir.path(), "refused")?,
    );

    let (status, body) = import(&lab, "linger-good", &keys.0.pem)?;
    ensure!(status == 201, "good key: {status} {body}");
    let malformed_pem = keys.1.malformed_pem();
    let (status, body) = import(&lab, "linger-malformed", &malformed_pem)?;
    ensure!(
        status == 422 && body.contains("\"error\""),
        "malformed key: {status} {body}"
    );
    set_faults(&control, "fail C_CreateObject CKR_TEMPLATE_INCONSISTENT")?;
    let (status, body) = import(&lab, "linger-refused", &keys.2.pem)?;
    ensure!(
        status >= 400 && body.contains("error"),
        "the token must refuse the third key: {status} {body}"
    );
    set_faults(&control, "")?;
    // The answer closes each connection; give the server a moment to let go of its buffers
    // (it polls every 20 ms) and check the key is on the token meanwhile.
    let listed = common::check(
        lab.cmd(&["token", "list", "--json"]).output()?,
        "token list",
    )?;
    ensure!(listed.contains("linger-good"), "{listed}");
    ensure!(!listed.contains("linger-refused"), "{listed}");
    std::thread::sleep(std::time::Duration::from_millis(300));

    let core = gcore(&lab, serve.pid())?;
    ensure!(
        count(&core, PROBE_LISTENER.as_bytes()) > 0,
        "the core search must find what the process holds (the listener name)"
    );
    let pin = std::fs::read_to_string(lab.path("token/user.pin"))?;
    let pin = pin.trim_end();
    ensure!(pin.len() >= 8, "a PIN long enough to search for");
    let mut needles = vec![("PIN".to_owned(), pin.as_bytes().to_vec())];
    for (name, key, pem) in [
        ("good", &keys.0, keys.0.pem.as_str()),
        ("malformed", &keys.1, malformed_pem.as_str()),
        ("refused", &keys.2, keys.2.pem.as_str()),
    ] {
        for (what, bytes) in key.needles(pem) {
            needles.push((format!("{name} key {what}"), bytes));
        }
    }
    let found: Vec<String> = needles
        .iter()
        .filter_map(|(what, bytes)| {
            let n = count(&core, bytes);
            (n > 0).then(|| format!("{what}: {n}"))
        })
        .collect();
    ensure!(
        found.is_empty(),
        "secrets found in a core of {} bytes: {found:#?}",
        core.len()
    );
    Ok(())
}

fn core_limit(pid: i32) -> Result<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .context("core limit line")?;
    Ok(line
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join("/"))
}

#[test]
fn by_default_the_process_writes_no_core() -> Result<()> {
    // Children inherit 1 MiB, so a zero can only come from tlsgate itself.
    let mib = rustix::process::Rlimit {
        current: Some(1 << 20),
        maximum: Some(1 << 20),
    };
    rustix::process::setrlimit(rustix::process::Resource::Core, mib)
        .context("raising this test's core limit (needs root when the hard limit is lower)")?;
    let lab = Lab::new()?;
    let (serve, _control) = start(&lab, false)?;
    ensure!(
        core_limit(serve.pid())? == "0/0",
        "RLIMIT_CORE must be 0/0 by default: {}",
        core_limit(serve.pid())?
    );
    drop(serve);
    let (serve, _control) = start(&lab, true)?;
    ensure!(
        core_limit(serve.pid())? == "1048576/1048576",
        "danger_allow_core_dumps leaves the inherited limit: {}",
        core_limit(serve.pid())?
    );
    Ok(())
}
