//! A PKCS#11 module for tests that wraps another PKCS#11 module and injects faults: latency,
//! chosen `CKR_*` failures and hangs, on any function, changeable while the process runs.
//!
//! Load `libtlsgate_pkcs11_shim.so` wherever a PKCS#11 module path is accepted. On the first
//! `C_GetFunctionList` it loads the module named by `TLSGATE_SHIM_MODULE` (SoftHSM2 by default)
//! and hands out its own function list whose every entry forwards to the real one after
//! consulting the fault directives (see [`directive`] for the syntax and the crate README for the
//! environment variables).
//!
//! Only `C_GetFunctionList` is exported. PKCS#11 3.0 callers that look for `C_GetInterface`
//! first (cryptoki does) fall back to it when the symbol is absent, and the shim implements the
//! 2.40 list only.
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::panic::{self, AssertUnwindSafe};

use cryptoki_sys::{CKR_ARGUMENTS_BAD, CKR_GENERAL_ERROR, CKR_OK, CK_FUNCTION_LIST_PTR_PTR, CK_RV};

pub mod directive;
pub mod fault;
mod forward;
pub mod real;
pub mod rv;

pub use forward::FUNCTIONS;

/// The PKCS#11 entry point.
///
/// # Safety
///
/// `list` must be NULL or point to writable storage for one pointer, as PKCS#11 requires. The
/// list written there must not be modified by the caller.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    panic::catch_unwind(AssertUnwindSafe(|| {
        if list.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        // Loading happens here so that a missing module is reported by C_Initialize, the call
        // whose failure every application already handles.
        let _ = real::load();
        let ours = forward::list();
        // SAFETY: `list` is non-null and writable (the function's contract). The list is
        // immutable and lives for the whole process; PKCS#11 hands it out as a mutable pointer
        // that callers only read.
        unsafe { *list = std::ptr::from_ref(ours).cast_mut() };
        CKR_OK
    }))
    .unwrap_or(CKR_GENERAL_ERROR)
}
