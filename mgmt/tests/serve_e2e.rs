//! `tlsgate serve` as a user runs it: the real binary, keys on a real SoftHSM2 token and in
//! software, real clients (curl, openssl s_client), the demo backend, signals.

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{check, curl, demo_backend, drivers, fail, tlsgate, uri, Lab, Serve};

/// Four listeners: ECDSA and RSA keys, each on the token and in software.
struct Keys {
    listeners: Vec<(&'static str, String, PathBuf, &'static str)>, // name, key ref, chain, sig type
}

fn lab_with_all_keys(lab: &Lab) -> Result<Keys> {
    let ecdsa = lab.token_key_with_chain("ec-p256", "tok-ecdsa")?;
    let rsa = lab.token_key_with_chain("rsa-2048", "tok-rsa")?;
    let (sw_ec_key, sw_ec) = lab.software_key_with_chain("EC", "sw-ecdsa")?;
    let (sw_rsa_key, sw_rsa) = lab.software_key_with_chain("RSA", "sw-rsa")?;
    Ok(Keys {
        listeners: vec![
            ("tok-ecdsa", uri("tok-ecdsa"), ecdsa, "ECDSA"),
            ("tok-rsa", uri("tok-rsa"), rsa, "RSA"),
            (
                "sw-ecdsa",
                format!("file:{}", sw_ec_key.display()),
                sw_ec,
                "ECDSA",
            ),
            (
                "sw-rsa",
                format!("file:{}", sw_rsa_key.display()),
                sw_rsa,
                "RSA",
            ),
        ],
    })
}

fn write_config(lab: &Lab, name: &str, io: &str, backend: &str, keys: &Keys) -> Result<PathBuf> {
    let mut toml = format!(
        "[pkcs11]\ntoken = \"lab\"\npin = \"file:{}\"\n\n[dataplane]\ncores = [0]\nio = \"{io}\"\n\n[dataplane.limits]\ndrain_timeout_ms = 5000\n",
        lab.p("token/user.pin")
    );
    for (name, key, chain, _) in &keys.listeners {
        write!(
            toml,
            "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n[[listener.certificate]]\nchain = \"{}\"\nkey = \"{key}\"\n",
            chain.display()
        )?;
    }
    let path = lab.path(name);
    std::fs::write(&path, toml)?;
    Ok(path)
}

/// Addresses by listener name, from the ready file.
fn addrs(config: &std::path::Path) -> Result<Vec<(String, u16)>> {
    let text = std::fs::read_to_string(config.with_extension("ready"))?;
    text.lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next().context("name")?.to_owned();
            let port = it
                .next()
                .and_then(|a| a.rsplit(':').next())
                .context("addr")?
                .parse()?;
            Ok((name, port))
        })
        .collect()
}

fn s_client(lab: &Lab, port: u16, version: &str) -> Result<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
        ])
        .args([
            "-CAfile",
            &lab.p("ca/root.pem"),
            version,
            "-verify_return_error",
        ])
        .stdin(Stdio::null())
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok(text)
}

#[test]
fn curl_and_openssl_reach_the_backend_over_tls12_and_tls13_with_token_and_software_keys(
) -> Result<()> {
    let lab = Lab::new()?;
    let keys = lab_with_all_keys(&lab)?;
    let (_backend, backend_addr) = demo_backend(lab.dir.path())?;
    for io in drivers() {
        let config = write_config(&lab, &format!("{io}.toml"), io, &backend_addr, &keys)?;
        let serve = Serve::start(&lab, &config)?;
        for (name, port) in addrs(&config)? {
            let sig = keys
                .listeners
                .iter()
                .find(|l| l.0 == name)
                .context("listener")?
                .3;
            for tls in ["--tlsv1.3", "--tls-max"] {
                let mut extra = vec![tls];
                if tls == "--tls-max" {
                    extra.push("1.2");
                }
                let out = curl(&lab, port, &format!("/{name}/{io}"), &extra)?;
                let body = check(out, &format!("curl {name} {io} {tls}"))?;
                assert!(
                    body.contains(&format!("request: GET /{name}/{io} HTTP/1.1")),
                    "{name} {io}: {body}"
                );
            }
            for version in ["-tls1_3", "-tls1_2"] {
                let text = s_client(&lab, port, version)?;
                assert!(
                    text.contains("Verify return code: 0 (ok)"),
                    "{name} {io} {version}: {text}"
                );
                let want = if version == "-tls1_3" {
                    "TLSv1.3"
                } else {
                    "TLSv1.2"
                };
                assert!(
                    text.contains(&format!("Protocol: {want}"))
                        || text.contains(&format!(", {want},")),
                    "{name} {io} {version}: {text}"
                );
                assert!(
                    text.contains(&format!("Peer signature type: {sig}"))
                        || (sig == "RSA" && text.contains("Peer signature type: RSA-PSS")),
                    "{name} {io} {version}: {text}"
                );
            }
        }
        serve.signal("TERM")?;
        let mut guard = serve.guard;
        let status = guard.child.wait()?;
        assert!(
            status.success(),
            "{io}: SIGTERM must drain and exit 0, got {status}"
        );
    }
    Ok(())
}

fn serial_of(lab: &Lab, port: u16) -> Result<String> {
    let text = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername localhost -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
            lab.p("ca/root.pem")
        ))
        .output()?;
    Ok(String::from_utf8_lossy(&text.stdout).trim().to_owned())
}

#[test]
fn sighup_reloads_certificates_and_a_bad_reload_changes_nothing() -> Result<()> {
    let lab = Lab::new()?;
    let chain = lab.token_key_with_chain("ec-p256", "web")?;
    let (_backend, backend_addr) = demo_backend(lab.dir.path())?;
    let keys = Keys {
        listeners: vec![("web", uri("web"), chain.clone(), "ECDSA")],
    };
    let config = write_config(&lab, "reload.toml", "portable", &backend_addr, &keys)?;
    let serve = Serve::start(&lab, &config)?;
    let before = serial_of(&lab, serve.port)?;
    assert!(before.starts_with("serial="), "{before}");

    // A new chain for the same token key, then SIGHUP: new connections get it.
    lab.run(&[
        "token",
        "issue-cert",
        "--key",
        &uri("web"),
        "--ca-dir",
        &lab.p("ca"),
        "--cn",
        "localhost",
        "--san",
        "localhost",
        "--out",
        &chain.display().to_string(),
    ])?;
    serve.signal("HUP")?;
    let after = wait_for(Duration::from_secs(20), || {
        let s = serial_of(&lab, serve.port)?;
        Ok((s != before).then_some(s))
    })?;
    assert!(after.starts_with("serial="), "{after}");

    // A chain that fails its checks (garbage) is refused; the running certificate stays.
    std::fs::write(
        &chain,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )?;
    serve.signal("HUP")?;
    // The process keeps serving the last good certificate.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(serial_of(&lab, serve.port)?, after);
    let body = check(
        curl(&lab, serve.port, "/still", &[])?,
        "curl after a bad reload",
    )?;
    assert!(body.contains("GET /still"), "{body}");
    Ok(())
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("condition not met after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn start_up_errors_name_their_cause() -> Result<()> {
    let lab = Lab::new()?;
    let chain = lab.token_key_with_chain("ec-p256", "web")?;
    let other = lab.token_key_with_chain("ec-p256", "other")?;
    let keys = |key: &str, chain: &PathBuf| Keys {
        listeners: vec![("web", key.to_owned(), chain.clone(), "ECDSA")],
    };
    let serve_fails = |config: PathBuf| -> Result<String> {
        let mut cmd = tlsgate();
        lab.env(&mut cmd);
        fail(
            cmd.args(["serve", "--config"]).arg(config).output()?,
            "serve with a bad config",
        )
    };

    // A key that is not on the token.
    let c = write_config(
        &lab,
        "missing.toml",
        "portable",
        "127.0.0.1:9",
        &keys(&uri("ghost"), &chain),
    )?;
    let err = serve_fails(c)?;
    assert!(err.contains("no private key matches"), "{err}");

    // A chain whose leaf belongs to another key.
    let c = write_config(
        &lab,
        "mismatch.toml",
        "portable",
        "127.0.0.1:9",
        &keys(&uri("web"), &other),
    )?;
    let err = serve_fails(c)?;
    assert!(err.contains("different key"), "{err}");

    // An unknown key in the file.
    let c = lab.path("typo.toml");
    std::fs::write(
        &c,
        "[dataplane]\ncores = [0]\nio = \"portable\"\nworkers = 3\n",
    )?;
    let err = serve_fails(c)?;
    assert!(err.contains("workers"), "{err}");

    // A wrong PIN.
    let bad_pin = lab.path("bad.pin");
    std::fs::write(&bad_pin, "0000")?;
    std::fs::set_permissions(
        &bad_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let c = write_config(
        &lab,
        "pin.toml",
        "portable",
        "127.0.0.1:9",
        &keys(&uri("web"), &chain),
    )?;
    let text = std::fs::read_to_string(&c)?
        .replace(&lab.p("token/user.pin"), &bad_pin.display().to_string());
    std::fs::write(&c, text)?;
    let err = serve_fails(c)?;
    assert!(err.contains("CKR_PIN_INCORRECT"), "{err}");

    // A port another process holds (bound without SO_REUSEPORT): a start error naming the
    // listener, the address and the cause, on both drivers, and no ready file.
    let holder = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = holder.local_addr()?;
    for io in drivers() {
        let c = write_config(
            &lab,
            &format!("taken-{io}.toml"),
            io,
            "127.0.0.1:9",
            &keys(&uri("web"), &chain),
        )?;
        let text = std::fs::read_to_string(&c)?
            .replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{taken}\""));
        std::fs::write(&c, text)?;
        let ready = c.with_extension("ready");
        let mut cmd = tlsgate();
        lab.env(&mut cmd);
        let err = fail(
            cmd.args(["serve", "--config"])
                .arg(&c)
                .arg("--ready-file")
                .arg(&ready)
                .output()?,
            "serve on a port in use",
        )?;
        assert!(
            err.contains("web") && err.contains(&taken.to_string()) && err.contains("in use"),
            "{io}: {err}"
        );
        assert!(!ready.exists(), "{io}: a ready file was written");
    }
    drop(holder);
    Ok(())
}

#[test]
fn a_dead_backend_fails_that_connection_only() -> Result<()> {
    let lab = Lab::new()?;
    let chain = lab.token_key_with_chain("ec-p256", "web")?;
    // Bind and drop a socket to get a port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (_backend, backend_addr) = demo_backend(lab.dir.path())?;
    let mut toml = format!(
        "[pkcs11]\ntoken = \"lab\"\npin = \"file:{}\"\n[dataplane]\ncores = [0]\nio = \"portable\"\n",
        lab.p("token/user.pin")
    );
    for (name, backend) in [("dead", dead.to_string()), ("live", backend_addr)] {
        write!(toml, "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n[[listener.certificate]]\nchain = \"{}\"\nkey = \"{}\"\n", chain.display(), uri("web"))?;
    }
    let config = lab.path("dead.toml");
    std::fs::write(&config, toml)?;
    let _serve = Serve::start(&lab, &config)?;
    let ports = addrs(&config)?;
    let port = |n: &str| {
        ports
            .iter()
            .find(|p| p.0 == n)
            .map(|p| p.1)
            .context("listener")
    };
    let out = curl(&lab, port("dead")?, "/", &[])?;
    assert!(!out.status.success(), "a dead backend cannot answer");
    let body = check(
        curl(&lab, port("live")?, "/ok", &[])?,
        "curl to the live listener",
    )?;
    assert!(body.contains("GET /ok"), "{body}");
    Ok(())
}
