//! The PKCS#11 fault-injection shim over a real SoftHSM2 token, driven through cryptoki: latency
//! lands on signatures, chosen CKR codes come back from the chosen calls, a hang blocks until it
//! is cleared, directives change while the process runs, and everything else is forwarded as is.

#[path = "shim_support.rs"]
mod support;

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use support::{Lab, Turn};

/// Directives read once from the environment for this whole process. They touch only the random
/// number functions, which no other test here uses; the bad line must be reported.
const ENV_FAULTS: &str = "fail C_GenerateRandom CKR_DEVICE_ERROR every 2; frobnicate C_Sign";

const KEY_LABEL: &str = "shim-ec";
/// DER OID of prime256v1, the CKA_EC_PARAMS of a P-256 key.
const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const DIGEST: [u8; 32] = [0x5a; 32];

/// The shim, initialised once for the process, with its slot and the test key's handle.
struct Shim {
    pkcs11: Pkcs11,
    slot: Slot,
    pin: String,
    key: ObjectHandle,
    /// SoftHSM2 logs out and forgets object handles when a slot's last session closes: this one
    /// stays open so `key` stays valid.
    _keepalive: Mutex<Session>,
}

/// The turn and the shared state; `None` (already explained) where SoftHSM2 is missing.
fn setup() -> Result<Option<(Turn, &'static Shim)>> {
    let Some(turn) = Lab::lock(ENV_FAULTS)? else {
        return Ok(None);
    };
    static SHIM: OnceLock<std::result::Result<Shim, String>> = OnceLock::new();
    let shim = SHIM
        .get_or_init(|| open_shim(&turn).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("opening the token through the shim: {e}"))?;
    Ok(Some((turn, shim)))
}

fn open_shim(lab: &Lab) -> Result<Shim> {
    let pkcs11 = Pkcs11::new(&lab.shim)?;
    // Someone else in this process may have initialised SoftHSM2 already; the shim forwards
    // its answer.
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    let slot = find_slot(&pkcs11, lab.label())?;
    let session = login(&pkcs11, slot, lab.pin())?;
    // Generated through the shim, so C_GenerateKeyPair is forwarded too.
    let public = [
        Attribute::Token(true),
        Attribute::Label(KEY_LABEL.into()),
        Attribute::Id(vec![0x42]),
        Attribute::EcParams(P256.to_vec()),
        Attribute::Verify(true),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Label(KEY_LABEL.into()),
        Attribute::Id(vec![0x42]),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
    ];
    let (_, key) = session.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?;
    Ok(Shim {
        pkcs11,
        slot,
        pin: lab.pin().to_owned(),
        key,
        _keepalive: Mutex::new(session),
    })
}

fn find_slot(pkcs11: &Pkcs11, label: &str) -> Result<Slot> {
    for slot in pkcs11.get_slots_with_token()? {
        if pkcs11.get_token_info(slot)?.label().trim_end() == label {
            return Ok(slot);
        }
    }
    anyhow::bail!("no token labelled {label}")
}

fn login(pkcs11: &Pkcs11, slot: Slot, pin: &str) -> Result<Session> {
    let session = pkcs11.open_rw_session(slot)?;
    match session.login(UserType::User, Some(&AuthPin::from(pin))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(e.into()),
    }
}

impl Shim {
    fn session(&self) -> Result<Session> {
        login(&self.pkcs11, self.slot, &self.pin)
    }

    fn sign(&self, session: &Session) -> cryptoki::error::Result<Vec<u8>> {
        session.sign(&Mechanism::Ecdsa, self.key, &DIGEST)
    }
}

fn count(lines: &[String], wanted: &str) -> usize {
    lines.iter().filter(|l| l.as_str() == wanted).count()
}

#[test]
fn delay_adds_latency_once_per_signature() -> Result<()> {
    let Some((lab, shim)) = setup()? else {
        return Ok(());
    };
    let session = shim.session()?;

    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        ensure!(
            shim.sign(&session)?.len() == 64,
            "a P-256 signature is r||s"
        );
        fastest = fastest.min(start.elapsed());
    }
    lab.set_faults("delay C_Sign 20ms\n")?;
    let mark = lab.log_mark();
    let mut slowest_delayed = Duration::ZERO;
    for _ in 0..3 {
        let start = Instant::now();
        shim.sign(&session)?;
        let took = start.elapsed();
        // A lower bound: the shim sleeps at least that long (a loaded machine only adds).
        ensure!(
            took >= Duration::from_millis(20),
            "delayed sign took only {took:?}"
        );
        slowest_delayed = slowest_delayed.max(took);
    }
    // The delay is the shim's, not SoftHSM's: the fastest undelayed signature of the same session
    // takes a fraction of a delayed one (SoftHSM signs in well under a millisecond).
    ensure!(
        fastest * 2 < slowest_delayed,
        "undelayed sign took {fastest:?}, delayed {slowest_delayed:?}"
    );
    // cryptoki makes two C_Sign calls per signature (length, then signature): one delay each.
    let log = lab.log_since(mark);
    ensure!(count(&log, "C_Sign delayed 20ms") == 3, "log: {log:?}");

    lab.set_faults("")?;
    let mut cleared = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        shim.sign(&session)?;
        cleared = cleared.min(start.elapsed());
    }
    // A delayed signature took >= 20 ms; cleared, the fastest of five is back to a fraction of
    // that.
    ensure!(
        cleared * 2 < slowest_delayed,
        "delay outlived its directive: {cleared:?} after clearing, {slowest_delayed:?} delayed"
    );
    Ok(())
}

#[test]
fn injected_errors_come_back_from_the_chosen_call_then_clear() -> Result<()> {
    let Some((lab, shim)) = setup()? else {
        return Ok(());
    };
    let session = shim.session()?;

    lab.set_faults("fail C_Sign CKR_DEVICE_ERROR")?;
    let mark = lab.log_mark();
    match shim.sign(&session) {
        Err(CkError::Pkcs11(RvError::DeviceError, Function::Sign)) => {}
        other => anyhow::bail!("expected CKR_DEVICE_ERROR from C_Sign, got {other:?}"),
    }
    ensure!(
        lab.log_since(mark)
            .contains(&"C_Sign failed CKR_DEVICE_ERROR".to_owned()),
        "the failure is logged"
    );
    lab.set_faults("")?;
    // Same session: the shim ended the real signing operation the fault interrupted.
    shim.sign(&session)
        .context("sign on the same session after CKR_DEVICE_ERROR was cleared")?;

    lab.set_faults("fail C_SignInit CKR_SESSION_HANDLE_INVALID")?;
    match shim.sign(&session) {
        Err(CkError::Pkcs11(RvError::SessionHandleInvalid, Function::SignInit)) => {}
        other => {
            anyhow::bail!("expected CKR_SESSION_HANDLE_INVALID from C_SignInit, got {other:?}")
        }
    }
    lab.set_faults("")?;
    shim.sign(&session)?;

    lab.set_faults("fail C_OpenSession CKR_TOKEN_NOT_PRESENT")?;
    match shim.pkcs11.open_rw_session(shim.slot) {
        Err(CkError::Pkcs11(RvError::TokenNotPresent, Function::OpenSession)) => {}
        other => anyhow::bail!("expected CKR_TOKEN_NOT_PRESENT from C_OpenSession, got {other:?}"),
    }
    lab.set_faults("")?;
    let fresh = shim.pkcs11.open_rw_session(shim.slot)?;

    lab.set_faults("fail C_Login 0xa3")?;
    match fresh.login(UserType::User, Some(&AuthPin::from(lab.pin()))) {
        Err(CkError::Pkcs11(RvError::PinExpired, Function::Login)) => {}
        other => anyhow::bail!("expected CKR_PIN_EXPIRED from C_Login, got {other:?}"),
    }
    lab.set_faults("")?;
    shim.sign(&fresh)?;
    Ok(())
}

#[test]
fn after_and_every_choose_which_signatures_fail() -> Result<()> {
    let Some((lab, shim)) = setup()? else {
        return Ok(());
    };
    let session = shim.session()?;

    lab.set_faults("fail C_Sign CKR_DEVICE_ERROR after 2")?;
    let outcomes: Vec<bool> = (0..4).map(|_| shim.sign(&session).is_ok()).collect();
    ensure!(
        outcomes == [true, true, false, false],
        "after 2: {outcomes:?}"
    );

    lab.set_faults("fail C_Sign CKR_DEVICE_ERROR every 3")?;
    let outcomes: Vec<bool> = (0..6).map(|_| shim.sign(&session).is_ok()).collect();
    ensure!(
        outcomes == [true, true, false, true, true, false],
        "every 3: {outcomes:?}"
    );
    Ok(())
}

#[test]
fn hang_blocks_a_signature_until_cleared() -> Result<()> {
    let Some((lab, shim)) = setup()? else {
        return Ok(());
    };
    let session = shim.session()?;
    lab.set_faults("hang C_Sign")?;
    let mark = lab.log_mark();

    let (done, finished) = mpsc::channel();
    let signer = thread::spawn(move || {
        let result = shim.sign(&session);
        let _ = done.send(result.map(|s| s.len()));
    });
    match finished.recv_timeout(Duration::from_millis(100)) {
        Err(mpsc::RecvTimeoutError::Timeout) => {}
        other => anyhow::bail!("the sign was not held by the hang: {other:?}"),
    }
    ensure!(
        lab.log_since(mark).contains(&"C_Sign hung".to_owned()),
        "the shim says it is holding the call"
    );

    let released = Instant::now();
    lab.set_faults("")?;
    let result = finished
        .recv_timeout(Duration::from_secs(10))
        .context("the sign did not finish once the hang was cleared")?;
    ensure!(result? == 64, "the released sign produced a signature");
    ensure!(
        released.elapsed() < Duration::from_secs(1),
        "release took {:?}",
        released.elapsed()
    );
    signer
        .join()
        .map_err(|_| anyhow::anyhow!("signer thread panicked"))?;
    ensure!(lab.log_since(mark).contains(&"C_Sign released".to_owned()));
    Ok(())
}

#[test]
fn bad_control_directives_are_reported_once_and_the_rest_applies() -> Result<()> {
    let Some((lab, shim)) = setup()? else {
        return Ok(());
    };
    let session = shim.session()?;
    lab.set_faults(
        "# slow and broken\nexplode C_Sign now\ndelay C_Sign 5ms; fail C_Nowhere 0x30\n",
    )?;
    let mark = lab.log_mark();
    shim.sign(&session)?;
    shim.sign(&session)?;
    let log = lab.log_since(mark);
    let bad: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("ignored directive"))
        .collect();
    ensure!(bad.len() == 2, "each bad line reported once: {log:?}");
    ensure!(bad[0].contains("unknown directive `explode`"), "{log:?}");
    ensure!(
        bad[1].contains("unknown PKCS#11 function `C_Nowhere`"),
        "{log:?}"
    );
    ensure!(
        count(&log, "C_Sign delayed 5ms") == 2,
        "the good line still applies: {log:?}"
    );
    Ok(())
}

#[test]
fn environment_directives_apply_for_the_whole_process() -> Result<()> {
    let Some((lab, shim)) = setup()? else {
        return Ok(());
    };
    let session = shim.session()?;
    // every 2: the first call of this process goes through, the second fails.
    session
        .generate_random_vec(16)
        .context("first C_GenerateRandom")?;
    match session.generate_random_vec(16) {
        Err(CkError::Pkcs11(RvError::DeviceError, Function::GenerateRandom)) => {}
        other => anyhow::bail!("expected the env directive to fail the 2nd call: {other:?}"),
    }
    let log = lab.log_since(0);
    ensure!(
        log.iter()
            .any(|l| l.contains("TLSGATE_SHIM_FAULTS")
                && l.contains("unknown directive `frobnicate`")),
        "the bad env directive is reported: {log:?}"
    );
    Ok(())
}

#[test]
fn everything_else_is_forwarded_unchanged() -> Result<()> {
    let Some((lab, shim)) = setup()? else {
        return Ok(());
    };
    // The real module in the same process: it is already initialised through the shim.
    let direct = Pkcs11::new(&lab.softhsm)?;
    match direct.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    let direct_slot = find_slot(&direct, lab.label())?;
    ensure!(direct_slot == shim.slot, "the same slot ids");
    let (a, b) = (
        direct.get_token_info(direct_slot)?,
        shim.pkcs11.get_token_info(shim.slot)?,
    );
    ensure!(a.serial_number() == b.serial_number() && a.model() == b.model());
    ensure!(direct.get_mechanism_list(direct_slot)? == shim.pkcs11.get_mechanism_list(shim.slot)?);

    let listing = |pkcs11: &Pkcs11, slot| -> Result<Vec<Vec<Attribute>>> {
        let session = login(pkcs11, slot, lab.pin())?;
        let mut objects = Vec::new();
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for handle in session.find_objects(&[Attribute::Class(class)])? {
                let wanted = [
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::KeyType,
                ];
                let mut attributes = session.get_attributes(handle, &wanted)?;
                if class == ObjectClass::PUBLIC_KEY {
                    attributes.extend(session.get_attributes(handle, &[AttributeType::EcPoint])?);
                }
                objects.push(attributes);
            }
        }
        Ok(objects)
    };
    let through_shim = listing(&shim.pkcs11, shim.slot)?;
    ensure!(
        through_shim.len() == 2,
        "the key pair is listed: {through_shim:?}"
    );
    ensure!(
        through_shim.iter().any(|o| o
            .iter()
            .any(|a| matches!(a, Attribute::EcPoint(p) if p.len() == 67))),
        "the public point is exported (04 41 04 || X || Y)"
    );
    ensure!(format!("{through_shim:?}") == format!("{:?}", listing(&direct, direct_slot)?));
    Ok(())
}

/// pkcs11-tool makes one C_Sign with a ready buffer (no size query): the fault must land on that
/// real call too, and an external process sees the shim's faults like this one does.
#[test]
fn pkcs11_tool_sees_faults_on_a_single_call_signature() -> Result<()> {
    let Some((lab, _shim)) = setup()? else {
        return Ok(());
    };
    if !tlsgate_hw_tests::skip::unless(tlsgate_hw_tests::skip::tool_missing(
        "pkcs11-tool",
        "opensc",
    )) {
        return Ok(());
    }
    let input = lab.dir.path().join("digest");
    let output = lab.dir.path().join("signature");
    std::fs::write(&input, DIGEST)?;
    let run = |faults: &str| {
        std::process::Command::new("pkcs11-tool")
            .env("TLSGATE_SHIM_FAULTS", faults)
            .env("TLSGATE_SHIM_LOG_CALLS", "1")
            .arg("--module")
            .arg(&lab.shim)
            .args(["--token-label", lab.label(), "--login", "--pin", lab.pin()])
            .args(["--sign", "--mechanism", "ECDSA", "--label", KEY_LABEL])
            .arg("--input-file")
            .arg(&input)
            .arg("--output-file")
            .arg(&output)
            .output()
    };

    let mark = lab.log_mark();
    let failed = run("fail C_Sign CKR_DEVICE_ERROR")?;
    ensure!(
        !failed.status.success(),
        "pkcs11-tool signed through a failing C_Sign"
    );
    // pkcs11-tool retries a failed C_Sign as C_SignUpdate; the real module must then say the
    // operation is over, as PKCS#11 ends an operation whose C_Sign failed.
    let stderr = String::from_utf8_lossy(&failed.stderr);
    ensure!(
        stderr.contains("C_Sign failed: rv = CKR_DEVICE_ERROR")
            || stderr.contains("C_SignUpdate failed: rv = CKR_OPERATION_NOT_INITIALIZED"),
        "pkcs11-tool: {stderr}"
    );
    let log = lab.log_since(mark);
    ensure!(
        count(&log, "C_Sign call 1") == 1 && count(&log, "C_Sign call 2") == 0,
        "a single C_Sign call: {log:?}"
    );
    ensure!(
        count(&log, "C_Sign failed CKR_DEVICE_ERROR") == 1,
        "{log:?}"
    );

    let signed = run("delay C_Sign 20ms")?;
    ensure!(
        signed.status.success(),
        "pkcs11-tool through a slow shim: {}",
        String::from_utf8_lossy(&signed.stderr)
    );
    ensure!(
        std::fs::read(&output)?.len() == 64,
        "a P-256 r||s signature"
    );
    ensure!(count(&lab.log_since(mark), "C_Sign delayed 20ms") == 1);
    Ok(())
}
