//! A shim whose real module cannot be loaded still loads itself, and fails C_Initialize with
//! CKR_GENERAL_ERROR and a message saying which module is missing (a process of its own: the
//! shim loads its real module once per process).

#[path = "shim_support.rs"]
mod support;

use anyhow::{ensure, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

#[test]
fn missing_real_module_fails_initialize_with_general_error() -> Result<()> {
    let shim = support::shim_path()?;
    let dir = support::process_dir("shim-missing")?;
    let missing = dir.path().join("no-such-pkcs11-module.so");
    let log = dir.path().join("shim.log");
    // The only test in this process, and no PKCS#11 call has happened yet.
    std::env::set_var("TLSGATE_SHIM_MODULE", &missing);
    std::env::set_var("TLSGATE_SHIM_LOG", &log);
    std::env::remove_var("TLSGATE_SHIM_CONTROL");
    std::env::remove_var("TLSGATE_SHIM_FAULTS");

    let pkcs11 = Pkcs11::new(&shim)?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Err(CkError::Pkcs11(RvError::GeneralError, Function::Initialize)) => {}
        other => anyhow::bail!("expected CKR_GENERAL_ERROR from C_Initialize, got {other:?}"),
    }
    match pkcs11.get_all_slots() {
        Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, Function::GetSlotList)) => {}
        other => anyhow::bail!("expected CKR_CRYPTOKI_NOT_INITIALIZED after it, got {other:?}"),
    }
    let log = std::fs::read_to_string(&log)?;
    ensure!(
        log.contains("cannot use the real module") && log.contains("no-such-pkcs11-module.so"),
        "the message names the missing module: {log:?}"
    );
    Ok(())
}
