//! Token initialisation (C_InitToken + C_InitPIN) for lab and test tokens.

use std::path::Path;

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{from_ck, pkcs11_of};
use crate::error::{Error, Result};

/// Initialises the first uninitialised token of `module_path` with `label`, sets its SO PIN and
/// its user PIN. SoftHSM2 always offers one such free slot; a module without one gets
/// [`Error::TokenNotFound`] naming the label. PINs travel only through PKCS#11 calls, never
/// through a command line.
pub fn init_token(
    module_path: &Path,
    label: &str,
    so_pin: &Zeroizing<String>,
    user_pin: &Zeroizing<String>,
) -> Result<()> {
    let pkcs11 = pkcs11_of(module_path)?;
    let mut free = None;
    for slot in pkcs11.get_slots_with_token().map_err(from_ck)? {
        let info = pkcs11.get_token_info(slot).map_err(from_ck)?;
        if info.token_initialized() {
            if info.label().trim_end() == label {
                return Err(Error::TokenExists {
                    label: label.to_owned(),
                });
            }
        } else if free.is_none() {
            free = Some(slot);
        }
    }
    let slot = free.ok_or_else(|| Error::TokenNotFound {
        label: format!("{label} (no uninitialised token to initialise)"),
        module: module_path.to_owned(),
    })?;
    let so = AuthPin::from(so_pin.as_str());
    pkcs11.init_token(slot, &so, label).map_err(from_ck)?;
    // SoftHSM2 moves a freshly initialised token to a new slot: find it again by label.
    let mut slot = None;
    for s in pkcs11.get_slots_with_token().map_err(from_ck)? {
        let info = pkcs11.get_token_info(s).map_err(from_ck)?;
        if info.token_initialized() && info.label().trim_end() == label {
            slot = Some(s);
            break;
        }
    }
    let slot = slot.ok_or_else(|| Error::TokenNotFound {
        label: label.to_owned(),
        module: module_path.to_owned(),
    })?;
    let session = pkcs11.open_rw_session(slot).map_err(from_ck)?;
    session.login(UserType::So, Some(&so)).map_err(from_ck)?;
    session
        .init_pin(&AuthPin::from(user_pin.as_str()))
        .map_err(from_ck)?;
    session.logout().map_err(from_ck)?;
    Ok(())
}
