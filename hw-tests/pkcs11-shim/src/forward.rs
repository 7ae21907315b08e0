//! The shim's function list: one wrapper per PKCS#11 2.40 function. Each wrapper runs the call
//! under the fault configuration and otherwise hands its arguments unchanged to the real module.
//! Most wrappers come from one macro; the few that need more (loading errors, the two-call size
//! query, ending an operation the real module still holds) are written out below it.

#![allow(non_snake_case)]

use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use cryptoki_sys::*;

use crate::fault::Faults;
use crate::real;

/// The largest signature the shim will produce to end a failed signing operation. Real
/// signatures are at most a few KiB; a larger size answer means the operation is broken anyway.
const MAX_SCRATCH_SIGNATURE: usize = 64 * 1024;

/// Runs `body` so that no panic crosses the C boundary: unwinding into C is undefined behaviour,
/// and a test module must never be the thing that crashes the process under test.
fn guarded(function: &'static str, body: impl FnOnce() -> CK_RV) -> CK_RV {
    panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        eprintln!("tlsgate-pkcs11-shim: internal error in {function}; answering CKR_GENERAL_ERROR");
        CKR_GENERAL_ERROR
    })
}

macro_rules! forwarders {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
                static CALLS: AtomicU64 = AtomicU64::new(0);
                guarded(stringify!($name), || {
                    Faults::get(lookup).run(stringify!($name), &CALLS, true, || {
                        let Some(list) = real::list() else {
                            return CKR_CRYPTOKI_NOT_INITIALIZED;
                        };
                        let Some(function) = list.$name else {
                            return CKR_FUNCTION_NOT_SUPPORTED;
                        };
                        // SAFETY: the caller upholds the PKCS#11 contract for these arguments,
                        // and they reach the function that defines that contract unchanged.
                        unsafe { function($($arg),*) }
                    }, || {})
                })
            }
        )*

        /// Every function a directive may name, as spelled in PKCS#11.
        pub const FUNCTIONS: &[&str] = &[
            "C_Initialize", "C_Sign", "C_SignUpdate", "C_SignFinal", $(stringify!($name)),*
        ];

        fn build_list() -> CK_FUNCTION_LIST {
            CK_FUNCTION_LIST {
                // The shim implements the 2.40 list whatever the real module's version.
                version: CK_VERSION { major: 2, minor: 40 },
                C_GetFunctionList: Some(crate::C_GetFunctionList),
                C_Initialize: Some(C_Initialize),
                C_Sign: Some(C_Sign),
                C_SignUpdate: Some(C_SignUpdate),
                C_SignFinal: Some(C_SignFinal),
                $($name: Some($name),)*
            }
        }
    };
}

forwarders! {
    C_Finalize(a1: *mut c_void);
    C_GetInfo(a1: *mut CK_INFO);
    C_GetSlotList(a1: CK_BBOOL, a2: *mut CK_SLOT_ID, a3: *mut CK_ULONG);
    C_GetSlotInfo(a1: CK_SLOT_ID, a2: *mut CK_SLOT_INFO);
    C_GetTokenInfo(a1: CK_SLOT_ID, a2: *mut CK_TOKEN_INFO);
    C_GetMechanismList(a1: CK_SLOT_ID, a2: *mut CK_MECHANISM_TYPE, a3: *mut CK_ULONG);
    C_GetMechanismInfo(a1: CK_SLOT_ID, a2: CK_MECHANISM_TYPE, a3: *mut CK_MECHANISM_INFO);
    C_InitToken(a1: CK_SLOT_ID, a2: *mut CK_UTF8CHAR, a3: CK_ULONG, a4: *mut CK_UTF8CHAR);
    C_InitPIN(a1: CK_SESSION_HANDLE, a2: *mut CK_UTF8CHAR, a3: CK_ULONG);
    C_SetPIN(a1: CK_SESSION_HANDLE, a2: *mut CK_UTF8CHAR, a3: CK_ULONG, a4: *mut CK_UTF8CHAR, a5: CK_ULONG);
    C_OpenSession(a1: CK_SLOT_ID, a2: CK_FLAGS, a3: *mut c_void, a4: CK_NOTIFY, a5: *mut CK_SESSION_HANDLE);
    C_CloseSession(a1: CK_SESSION_HANDLE);
    C_CloseAllSessions(a1: CK_SLOT_ID);
    C_GetSessionInfo(a1: CK_SESSION_HANDLE, a2: *mut CK_SESSION_INFO);
    C_GetOperationState(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG);
    C_SetOperationState(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: CK_OBJECT_HANDLE, a5: CK_OBJECT_HANDLE);
    C_Login(a1: CK_SESSION_HANDLE, a2: CK_USER_TYPE, a3: *mut CK_UTF8CHAR, a4: CK_ULONG);
    C_Logout(a1: CK_SESSION_HANDLE);
    C_CreateObject(a1: CK_SESSION_HANDLE, a2: *mut CK_ATTRIBUTE, a3: CK_ULONG, a4: *mut CK_OBJECT_HANDLE);
    C_CopyObject(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG, a5: *mut CK_OBJECT_HANDLE);
    C_DestroyObject(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE);
    C_GetObjectSize(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE, a3: *mut CK_ULONG);
    C_GetAttributeValue(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG);
    C_SetAttributeValue(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG);
    C_FindObjectsInit(a1: CK_SESSION_HANDLE, a2: *mut CK_ATTRIBUTE, a3: CK_ULONG);
    C_FindObjects(a1: CK_SESSION_HANDLE, a2: *mut CK_OBJECT_HANDLE, a3: CK_ULONG, a4: *mut CK_ULONG);
    C_FindObjectsFinal(a1: CK_SESSION_HANDLE);
    C_EncryptInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE);
    C_Encrypt(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_EncryptUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_EncryptFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG);
    C_DecryptInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE);
    C_Decrypt(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_DecryptUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_DecryptFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG);
    C_DigestInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM);
    C_Digest(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_DigestUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_DigestKey(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE);
    C_DigestFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG);
    C_SignInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE);
    C_SignRecoverInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE);
    C_SignRecover(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_VerifyInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE);
    C_Verify(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: CK_ULONG);
    C_VerifyUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_VerifyFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_VerifyRecoverInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE);
    C_VerifyRecover(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_DigestEncryptUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_DecryptDigestUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_SignEncryptUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_DecryptVerifyUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG);
    C_GenerateKey(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG, a5: *mut CK_OBJECT_HANDLE);
    C_GenerateKeyPair(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG, a5: *mut CK_ATTRIBUTE, a6: CK_ULONG, a7: *mut CK_OBJECT_HANDLE, a8: *mut CK_OBJECT_HANDLE);
    C_WrapKey(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE, a4: CK_OBJECT_HANDLE, a5: *mut CK_BYTE, a6: *mut CK_ULONG);
    C_UnwrapKey(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE, a4: *mut CK_BYTE, a5: CK_ULONG, a6: *mut CK_ATTRIBUTE, a7: CK_ULONG, a8: *mut CK_OBJECT_HANDLE);
    C_DeriveKey(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE, a4: *mut CK_ATTRIBUTE, a5: CK_ULONG, a6: *mut CK_OBJECT_HANDLE);
    C_SeedRandom(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_GenerateRandom(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_GetFunctionStatus(a1: CK_SESSION_HANDLE);
    C_CancelFunction(a1: CK_SESSION_HANDLE);
    C_WaitForSlotEvent(a1: CK_FLAGS, a2: *mut CK_SLOT_ID, a3: *mut c_void);
}

/// The shim's own function list, built once.
pub fn list() -> &'static CK_FUNCTION_LIST {
    static LIST: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();
    LIST.get_or_init(build_list)
}

/// The `'static` spelling of a function name, if it is one a directive may name.
pub fn lookup(name: &str) -> Option<&'static str> {
    FUNCTIONS.iter().copied().find(|known| *known == name)
}

unsafe extern "C" fn C_Initialize(init_args: *mut c_void) -> CK_RV {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    guarded("C_Initialize", || {
        let faults = Faults::get(lookup);
        let list = match real::load() {
            Ok(list) => list,
            Err(why) => {
                faults.report(why);
                return CKR_GENERAL_ERROR;
            }
        };
        faults.run(
            "C_Initialize",
            &CALLS,
            true,
            || match list.C_Initialize {
                // SAFETY: `init_args` is the caller's CK_C_INITIALIZE_ARGS (or NULL), passed on
                // unchanged to the module that defines its contract.
                Some(function) => unsafe { function(init_args) },
                None => CKR_FUNCTION_NOT_SUPPORTED,
            },
            || {},
        )
    })
}

unsafe extern "C" fn C_Sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    guarded("C_Sign", || {
        let real = real::list().and_then(|list| list.C_Sign);
        Faults::get(lookup).run(
            "C_Sign",
            &CALLS,
            // A NULL output asks only for the length: half of one signature, not one of its own.
            !signature.is_null(),
            || match real {
                // SAFETY: the caller's arguments, passed on unchanged to the module that
                // defines their contract.
                Some(function) => unsafe {
                    function(session, data, data_len, signature, signature_len)
                },
                None => CKR_CRYPTOKI_NOT_INITIALIZED,
            },
            || {
                if let Some(function) = real {
                    finish_signature(|out, out_len| {
                        // SAFETY: `data`/`data_len` are the caller's input for this very call,
                        // valid for its duration; `out`/`out_len` come from `finish_signature`.
                        unsafe { function(session, data, data_len, out, out_len) }
                    });
                }
            },
        )
    })
}

unsafe extern "C" fn C_SignUpdate(
    session: CK_SESSION_HANDLE,
    part: *mut CK_BYTE,
    part_len: CK_ULONG,
) -> CK_RV {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    guarded("C_SignUpdate", || {
        Faults::get(lookup).run(
            "C_SignUpdate",
            &CALLS,
            true,
            || match real::list().and_then(|list| list.C_SignUpdate) {
                // SAFETY: the caller's arguments, passed on unchanged to the module that
                // defines their contract.
                Some(function) => unsafe { function(session, part, part_len) },
                None => CKR_CRYPTOKI_NOT_INITIALIZED,
            },
            || end_multipart_signature(session),
        )
    })
}

unsafe extern "C" fn C_SignFinal(
    session: CK_SESSION_HANDLE,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    guarded("C_SignFinal", || {
        Faults::get(lookup).run(
            "C_SignFinal",
            &CALLS,
            !signature.is_null(),
            || match real::list().and_then(|list| list.C_SignFinal) {
                // SAFETY: the caller's arguments, passed on unchanged to the module that
                // defines their contract.
                Some(function) => unsafe { function(session, signature, signature_len) },
                None => CKR_CRYPTOKI_NOT_INITIALIZED,
            },
            || end_multipart_signature(session),
        )
    })
}

/// Ends the real module's multi-part signing operation on `session`, as an HSM that failed
/// C_SignUpdate or C_SignFinal would have.
fn end_multipart_signature(session: CK_SESSION_HANDLE) {
    if let Some(function) = real::list().and_then(|list| list.C_SignFinal) {
        finish_signature(|out, out_len| {
            // SAFETY: a session handle is plain data; `out`/`out_len` come from
            // `finish_signature`.
            unsafe { function(session, out, out_len) }
        });
    }
}

/// PKCS#11 says a signing call that fails (other than for a short buffer) ends the operation.
/// A fault answered by the shim never reached the real module, which still holds the operation
/// open and would refuse the next C_SignInit with CKR_OPERATION_ACTIVE; so the shim completes it
/// into a scratch buffer and throws the signature away. `sign(out, out_len)` makes the real call.
fn finish_signature(sign: impl Fn(*mut CK_BYTE, *mut CK_ULONG) -> CK_RV) {
    let mut len: CK_ULONG = 0;
    if sign(std::ptr::null_mut(), &mut len) != CKR_OK {
        // Any other answer has already ended the operation.
        return;
    }
    let Ok(size) = usize::try_from(len) else {
        return;
    };
    if size > MAX_SCRATCH_SIGNATURE {
        return;
    }
    let mut scratch = vec![0u8; size];
    let _ = sign(scratch.as_mut_ptr(), &mut len);
}
