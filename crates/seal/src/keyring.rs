//! Master keys: a [`Keyring`] is one consistent set of them (which is active, which are
//! retired); [`MasterKeys`] is the live handle the stores hold, reloading the keyring from its
//! [`KeySource`] when another process has rotated keys.

use super::SealError;
use rand::RngCore;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// How often a live handle asks its source whether the keyring changed.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// A master key's name: written in every header and field it seals, shown by `keys list`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MasterKeyId(String);

impl MasterKeyId {
    pub fn new(id: &str) -> Result<MasterKeyId, SealError> {
        let valid = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if valid {
            Ok(MasterKeyId(id.to_string()))
        } else {
            Err(SealError::InvalidKeyId(id.chars().take(80).collect()))
        }
    }

    /// A fresh id: `mk-` and 8 random hex digits.
    pub fn random() -> MasterKeyId {
        let mut bytes = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        MasterKeyId(format!("mk-{:08x}", u32::from_be_bytes(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MasterKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// 256 bits of key material, zeroed when dropped and never shown by `Debug`.
#[derive(Clone)]
pub struct KeyMaterial(Zeroizing<[u8; 32]>);

impl KeyMaterial {
    pub fn random() -> KeyMaterial {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        KeyMaterial(key)
    }

    /// From 64 hex digits. The error never repeats the input.
    pub fn from_hex(text: &str) -> Result<KeyMaterial, SealError> {
        let text = text.trim().as_bytes();
        if text.len() != 64 {
            return Err(SealError::Keyring(
                "key material must be 64 hex digits (256 bits)".into(),
            ));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        for (byte, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
            let (Some(hi), Some(lo)) = (hex_digit(pair[0]), hex_digit(pair[1])) else {
                return Err(SealError::Keyring(
                    "key material must be 64 hex digits (256 bits)".into(),
                ));
            };
            *byte = hi << 4 | lo;
        }
        Ok(KeyMaterial(key))
    }

    /// The material as 64 hex digits, for the keyring file only.
    pub fn to_hex(&self) -> Zeroizing<String> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = Zeroizing::new(String::with_capacity(64));
        for byte in self.0.iter() {
            text.push(DIGITS[usize::from(byte >> 4)] as char);
            text.push(DIGITS[usize::from(byte & 15)] as char);
        }
        text
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial(<redacted>)")
    }
}

/// One master key. A retired key keeps its id and dates but no longer its material: what
/// it sealed can never be opened again.
#[derive(Debug, Clone)]
pub struct MasterKey {
    pub id: MasterKeyId,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` while the key is live.
    pub retired_at: Option<i64>,
    material: Option<KeyMaterial>,
}

impl MasterKey {
    pub fn live(id: MasterKeyId, created_at: i64, material: KeyMaterial) -> MasterKey {
        MasterKey {
            id,
            created_at,
            retired_at: None,
            material: Some(material),
        }
    }

    pub fn retired(id: MasterKeyId, created_at: i64, retired_at: i64) -> MasterKey {
        MasterKey {
            id,
            created_at,
            retired_at: Some(retired_at),
            material: None,
        }
    }

    /// The material, `None` once retired.
    pub fn material(&self) -> Option<&KeyMaterial> {
        self.material.as_ref()
    }
}

/// A consistent set of master keys: ids unique, exactly one active and live, and the index
/// key for blind indexes.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<MasterKey>,
    active: MasterKeyId,
    index: KeyMaterial,
}

impl Keyring {
    /// A new keyring with one fresh master key, active, and a fresh index key.
    pub fn generate(now: i64) -> Keyring {
        let key = MasterKey::live(MasterKeyId::random(), now, KeyMaterial::random());
        Keyring {
            active: key.id.clone(),
            keys: vec![key],
            index: KeyMaterial::random(),
        }
    }

    /// A keyring from stored parts, checked.
    pub fn from_parts(
        keys: Vec<MasterKey>,
        active: MasterKeyId,
        index: KeyMaterial,
    ) -> Result<Keyring, SealError> {
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.id == key.id) {
                return Err(SealError::Keyring(format!(
                    "key {} is listed twice",
                    key.id
                )));
            }
        }
        match keys.iter().find(|k| k.id == active) {
            Some(k) if k.material.is_some() => {}
            Some(_) => {
                return Err(SealError::Keyring(format!(
                    "the active key {active} is retired"
                )))
            }
            None => {
                return Err(SealError::Keyring(format!(
                    "the active key {active} is not in the keyring"
                )))
            }
        }
        Ok(Keyring {
            keys,
            active,
            index,
        })
    }

    /// Every key, oldest first, retired ones included.
    pub fn keys(&self) -> &[MasterKey] {
        &self.keys
    }

    pub fn active_id(&self) -> &MasterKeyId {
        &self.active
    }

    /// The key new objects and fields are sealed with.
    pub(crate) fn active(&self) -> (&MasterKeyId, &KeyMaterial) {
        let material = self
            .keys
            .iter()
            .find(|k| k.id == self.active)
            .and_then(|k| k.material.as_ref());
        // `from_parts`, `generate` and `rotate` keep the active key live.
        match material {
            Some(m) => (&self.active, m),
            None => unreachable!("a keyring's active key is always live"),
        }
    }

    pub fn index_key(&self) -> &KeyMaterial {
        &self.index
    }

    /// The material of a key, to open what it sealed.
    pub(crate) fn material(&self, id: &MasterKeyId) -> Result<&KeyMaterial, SealError> {
        match self.keys.iter().find(|k| &k.id == id) {
            None => Err(SealError::UnknownKey(id.clone())),
            Some(k) => k
                .material
                .as_ref()
                .ok_or_else(|| SealError::RetiredKey(id.clone())),
        }
    }

    /// Adds a fresh master key and makes it the active one; returns its id.
    pub fn rotate(&mut self, now: i64) -> MasterKeyId {
        let mut id = MasterKeyId::random();
        while self.keys.iter().any(|k| k.id == id) {
            id = MasterKeyId::random();
        }
        self.keys
            .push(MasterKey::live(id.clone(), now, KeyMaterial::random()));
        self.active = id.clone();
        id
    }

    /// Forgets a key's material for good. The active key cannot be retired (rotate first);
    /// whether anything still needs the key is the caller's to check.
    pub fn retire(&mut self, id: &MasterKeyId, now: i64) -> Result<(), SealError> {
        if id == &self.active {
            return Err(SealError::Keyring(format!(
                "{id} is the active key; run `sparkle keyring rotate` first"
            )));
        }
        let key = self
            .keys
            .iter_mut()
            .find(|k| &k.id == id)
            .ok_or_else(|| SealError::UnknownKey(id.clone()))?;
        if key.retired_at.is_some() {
            return Err(SealError::RetiredKey(id.clone()));
        }
        key.retired_at = Some(now);
        key.material = None;
        Ok(())
    }
}

/// Where a live [`MasterKeys`] handle reloads its keyring from (the keyring file).
pub trait KeySource: Send + Sync + 'static {
    /// The keyring if it changed since the last call, `None` if it did not.
    fn reload(&self) -> Result<Option<Keyring>, SealError>;
}

/// The keyring a long-running process holds. `sparkle keyring rotate` in another process
/// changes the keyring file; the handle notices within a few seconds (and at once when it
/// meets a key id it does not know), so new objects use the new key and re-wrapped objects
/// keep opening.
pub struct MasterKeys {
    ring: RwLock<Arc<Keyring>>,
    source: Option<Box<dyn KeySource>>,
    checked: Mutex<Instant>,
}

impl fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKeys")
            .field("active", self.current().active_id())
            .finish_non_exhaustive()
    }
}

impl MasterKeys {
    /// A keyring that never changes (tests, one-shot commands).
    pub fn fixed(ring: Keyring) -> MasterKeys {
        MasterKeys {
            ring: RwLock::new(Arc::new(ring)),
            source: None,
            checked: Mutex::new(Instant::now()),
        }
    }

    /// A keyring that follows its source.
    pub fn watching(ring: Keyring, source: Box<dyn KeySource>) -> MasterKeys {
        MasterKeys {
            ring: RwLock::new(Arc::new(ring)),
            source: Some(source),
            checked: Mutex::new(Instant::now()),
        }
    }

    /// The keyring now, reloaded first if it is time to look.
    pub fn current(&self) -> Arc<Keyring> {
        let due = match self.checked.lock() {
            Ok(mut checked) if checked.elapsed() >= RELOAD_EVERY => {
                *checked = Instant::now();
                true
            }
            _ => false,
        };
        if due {
            self.reload();
        }
        self.snapshot()
    }

    /// The keyring holding `id`: reloaded once at once when the current one lacks it.
    pub(crate) fn holding(&self, id: &MasterKeyId) -> Arc<Keyring> {
        let ring = self.current();
        if ring.keys.iter().any(|k| &k.id == id) {
            return ring;
        }
        self.reload();
        self.snapshot()
    }

    fn snapshot(&self) -> Arc<Keyring> {
        match self.ring.read() {
            Ok(ring) => ring.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn reload(&self) {
        let Some(source) = &self.source else { return };
        match source.reload() {
            Ok(Some(ring)) => {
                tracing::info!(active = %ring.active, "keyring reloaded");
                match self.ring.write() {
                    Ok(mut slot) => *slot = Arc::new(ring),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(ring),
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the keyring; keeping the one loaded")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn material_never_shows_in_debug_output() {
        let ring = Keyring::generate(1);
        let hex = ring.active().1.to_hex();
        let shown = format!("{ring:?} {:?}", MasterKeys::fixed(ring.clone()));
        assert!(!shown.contains(hex.as_str()), "{shown}");
        assert!(!shown.contains(ring.index_key().to_hex().as_str()));
        let bad = KeyMaterial::from_hex(&format!("{}zz", &hex[..62])).expect_err("not hex");
        assert!(!bad.to_string().contains(&hex[..62]));
        assert_eq!(
            KeyMaterial::from_hex(&hex).expect("hex").bytes(),
            ring.active().1.bytes()
        );
    }

    #[test]
    fn rotation_adds_an_active_key_and_retirement_forgets_one() {
        let mut ring = Keyring::generate(1);
        let first = ring.active_id().clone();
        let second = ring.rotate(2);
        assert_eq!(ring.active_id(), &second);
        assert!(ring.material(&first).is_ok(), "old keys keep working");
        assert!(ring.retire(&second, 3).is_err(), "the active key stays");
        ring.retire(&first, 3).expect("retire");
        assert!(matches!(
            ring.material(&first),
            Err(SealError::RetiredKey(_))
        ));
        assert!(ring.retire(&first, 4).is_err(), "retired once");
        assert!(matches!(
            ring.material(&MasterKeyId::new("mk-nope").expect("id")),
            Err(SealError::UnknownKey(_))
        ));
    }

    #[test]
    fn inconsistent_keyrings_are_refused() {
        let a = MasterKey::live(MasterKeyId::new("a").expect("id"), 1, KeyMaterial::random());
        let b = MasterKey::retired(MasterKeyId::new("b").expect("id"), 1, 2);
        let id = |s: &str| MasterKeyId::new(s).expect("id");
        assert!(
            Keyring::from_parts(vec![a.clone(), b.clone()], id("a"), KeyMaterial::random()).is_ok()
        );
        assert!(
            Keyring::from_parts(vec![a.clone(), b.clone()], id("b"), KeyMaterial::random())
                .is_err()
        );
        assert!(Keyring::from_parts(vec![a.clone()], id("c"), KeyMaterial::random()).is_err());
        assert!(Keyring::from_parts(vec![a.clone(), a], id("a"), KeyMaterial::random()).is_err());
        for bad in ["", "a b", "ключ", &"x".repeat(65)] {
            assert!(MasterKeyId::new(bad).is_err(), "{bad:?}");
        }
    }
}
