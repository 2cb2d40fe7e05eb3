//! Keys derived from a master key for one purpose each (HKDF-SHA256, the purpose as the
//! info string): the field key, the key of signed image links, the key of worker tokens.
//! A derived key never leaves the process and is never stored.

use crate::KeyMaterial;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// The key derived from `master` for the purpose `info`.
pub fn derived_key(master: &KeyMaterial, info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    let hkdf = hkdf::Hkdf::<Sha256>::new(None, master.bytes());
    // 32 bytes is far below HKDF-SHA256's limit of 8160.
    if hkdf.expand(info, key.as_mut()).is_err() {
        unreachable!("HKDF-SHA256 gives 32 bytes");
    }
    key
}

/// HMAC-SHA256 under the key derived from `master` for the purpose `info`.
pub fn derived_mac(master: &KeyMaterial, info: &[u8]) -> Hmac<Sha256> {
    let key = derived_key(master, info);
    match Hmac::<Sha256>::new_from_slice(key.as_ref()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes a key of any length"),
    }
}

impl crate::MasterKeys {
    /// HMAC-SHA256 for the purpose `info` under the active master key, and that key's id
    /// (which whatever the MAC signs must carry, to be checked after a rotation).
    pub fn active_mac(&self, info: &[u8]) -> (crate::MasterKeyId, Hmac<Sha256>) {
        let ring = self.current();
        let (id, master) = ring.active();
        (id.clone(), derived_mac(master, info))
    }

    /// HMAC-SHA256 for the purpose `info` under master key `id`; `None` when the keyring
    /// (reloaded if another process rotated it) has no live key of that id.
    pub fn mac_under(&self, id: &crate::MasterKeyId, info: &[u8]) -> Option<Hmac<Sha256>> {
        let ring = self.holding(id);
        let master = ring.material(id).ok()?;
        Some(derived_mac(master, info))
    }
}
