//! Turning cryptoki errors into the keystore's, with the Cryptoki function and CKR name.

use std::collections::HashMap;
use std::sync::OnceLock;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use parking_lot::Mutex;

use crate::error::Error;

/// `C_SignInit` for `Function::SignInit`. Interned: there are ~70 functions, so the set is bounded.
fn function_name(f: Function) -> &'static str {
    // Process-wide by nature: names of constants, interned once.
    static NAMES: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let debug = format!("{f:?}");
    let mut names = NAMES.get_or_init(Default::default).lock();
    if let Some(n) = names.get(&debug) {
        return n;
    }
    let name: &'static str = Box::leak(format!("C_{debug}").into_boxed_str());
    names.insert(debug, name);
    name
}

/// `CKR_PIN_INCORRECT` for `RvError::PinIncorrect`.
pub(crate) fn rv_name(rv: &RvError) -> String {
    let debug = format!("{rv:?}");
    let (word, rest) = match debug.find('(') {
        Some(i) => debug.split_at(i),
        None => (debug.as_str(), ""),
    };
    let mut out = String::from("CKR");
    for c in word.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out.push_str(rest);
    out
}

pub(crate) fn from_ck(e: CkError) -> Error {
    match e {
        CkError::Pkcs11(rv, f) => Error::Pkcs11 {
            function: function_name(f),
            rv: rv_name(&rv),
        },
        other => Error::Pkcs11 {
            function: "cryptoki",
            rv: other.to_string(),
        },
    }
}

fn rv_of(e: &Error) -> Option<&str> {
    match e {
        Error::Pkcs11 { rv, .. } => Some(rv.as_str()),
        _ => None,
    }
}

/// Errors after which a session must not be reused.
pub(crate) fn is_session_fatal(e: &Error) -> bool {
    matches!(
        rv_of(e),
        Some(
            "CKR_SESSION_HANDLE_INVALID"
                | "CKR_SESSION_CLOSED"
                | "CKR_USER_NOT_LOGGED_IN"
                | "CKR_DEVICE_REMOVED"
                | "CKR_TOKEN_NOT_PRESENT"
                | "CKR_DEVICE_ERROR"
        )
    )
}

/// Errors that say the device (or the module's link to it) is gone, not that this one
/// operation or session was wrong: the token goes out of service and is recovered in the
/// background. A session handle that is invalid on a fresh session too counts as well
/// (`Token::sign_raw` checks that).
pub(crate) fn is_device_level(e: &Error) -> bool {
    matches!(
        rv_of(e),
        Some(
            "CKR_DEVICE_ERROR"
                | "CKR_DEVICE_REMOVED"
                | "CKR_TOKEN_NOT_PRESENT"
                | "CKR_CRYPTOKI_NOT_INITIALIZED"
                | "CKR_USER_NOT_LOGGED_IN"
                | "CKR_GENERAL_ERROR"
                | "CKR_SLOT_ID_INVALID"
        )
    )
}

/// Errors that end one session: another session may still work.
pub(crate) fn is_session_level(e: &Error) -> bool {
    matches!(
        rv_of(e),
        Some("CKR_SESSION_HANDLE_INVALID" | "CKR_SESSION_CLOSED")
    )
}

pub(crate) fn is_handle_invalid(e: &Error) -> bool {
    matches!(
        rv_of(e),
        Some("CKR_OBJECT_HANDLE_INVALID" | "CKR_KEY_HANDLE_INVALID")
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(rv_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            rv_name(&RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(
            rv_name(&RvError::CryptokiAlreadyInitialized),
            "CKR_CRYPTOKI_ALREADY_INITIALIZED"
        );
        assert_eq!(function_name(Function::SignInit), "C_SignInit");
        let e = from_ck(CkError::Pkcs11(RvError::DeviceError, Function::Sign));
        assert!(
            matches!(e, Error::Pkcs11 { function: "C_Sign", ref rv } if rv == "CKR_DEVICE_ERROR")
        );
        assert!(is_session_fatal(&e));
        assert!(is_device_level(&e));
        assert!(!is_session_level(&e));
    }

    #[test]
    fn per_operation_errors_are_not_device_level() {
        let e = |rv| from_ck(CkError::Pkcs11(rv, Function::Sign));
        for rv in [
            RvError::DataLenRange,
            RvError::KeyHandleInvalid,
            RvError::MechanismInvalid,
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
        ] {
            assert!(!is_device_level(&e(rv)), "{rv:?}");
        }
        for rv in [
            RvError::DeviceError,
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::CryptokiNotInitialized,
            RvError::UserNotLoggedIn,
            RvError::GeneralError,
        ] {
            assert!(is_device_level(&e(rv)), "{rv:?}");
        }
        assert!(is_session_level(&e(RvError::SessionHandleInvalid)));
    }
}
