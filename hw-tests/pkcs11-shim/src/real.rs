//! The real PKCS#11 module underneath: loaded once, never unloaded (a module's function pointers
//! may be held by any thread until the process exits).

use std::ffi::{CStr, CString};
use std::sync::OnceLock;

use cryptoki_sys::{CKR_OK, CK_FUNCTION_LIST, CK_FUNCTION_LIST_PTR_PTR, CK_RV};

/// Names the module to wrap.
pub const MODULE_ENV: &str = "TLSGATE_SHIM_MODULE";
/// The module wrapped when `TLSGATE_SHIM_MODULE` is unset: SoftHSM2 as Debian installs it.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

type GetFunctionList = unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV;

/// The real module's function list, or why it could not be had. Loaded on the first call.
pub fn load() -> &'static Result<CK_FUNCTION_LIST, String> {
    static REAL: OnceLock<Result<CK_FUNCTION_LIST, String>> = OnceLock::new();
    REAL.get_or_init(|| {
        let path = std::env::var(MODULE_ENV)
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_MODULE.to_owned());
        open(&path).map_err(|why| format!("cannot use the real module {path}: {why}"))
    })
}

/// The real function list, once `load` has succeeded.
pub fn list() -> Option<&'static CK_FUNCTION_LIST> {
    load().as_ref().ok()
}

fn open(path: &str) -> Result<CK_FUNCTION_LIST, String> {
    let c_path = CString::new(path).map_err(|_| "the path contains a NUL byte".to_owned())?;
    // RTLD_LOCAL keeps the real module's `C_*` symbols out of the global scope, where they could
    // be mistaken for the shim's; RTLD_NOW reports a broken module here rather than mid-call.
    // SAFETY: `c_path` is a valid NUL-terminated string; loading a PKCS#11 module runs only its
    // initialisers, which is what every PKCS#11 application does.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(dl_error());
    }
    // SAFETY: `handle` is a live handle from dlopen and the symbol name is NUL-terminated.
    let symbol = unsafe { libc::dlsym(handle, c"C_GetFunctionList".as_ptr()) };
    if symbol.is_null() {
        return Err(format!("it has no C_GetFunctionList: {}", dl_error()));
    }
    if std::ptr::eq(
        symbol.cast_const(),
        crate::C_GetFunctionList as *const libc::c_void,
    ) {
        return Err("it is this shim itself".to_owned());
    }
    // SAFETY: PKCS#11 defines C_GetFunctionList with exactly this C signature, and `symbol` is
    // that exported function of a PKCS#11 module.
    let get_function_list: GetFunctionList = unsafe { std::mem::transmute(symbol) };
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: `list` is a valid place for the module to store its pointer.
    let rv = unsafe { get_function_list(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!(
            "its C_GetFunctionList answered {}",
            crate::rv::name(rv)
        ));
    }
    // SAFETY: on CKR_OK the module points `list` at its function list, which lives as long as
    // the module stays loaded, and it is never unloaded. A copy keeps the shim off its memory.
    Ok(unsafe { *list })
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated message owned by libc, valid until the
    // next dl* call on this thread; it is copied out at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        return "unknown dynamic loader error".to_owned();
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned()
}
