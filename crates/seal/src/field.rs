//! Sealed database fields and blind indexes.
//!
//! A sealed field is text, so it fits any column: `sf2.` then unpadded URL-safe base64 of
//! `key id length (1) | key id | nonce (12) | AES-256-GCM ciphertext and tag`. The key is
//! HKDF-SHA256 of the master key named in front; the AAD names the field (e.g.
//! `jobs.request`) and the row it belongs to (e.g. the job id), so a value copied into
//! another column or row does not open.
//!
//! What is encrypted is the value padded to a size class (`length (4, big-endian) | value |
//! zeros`, 64 bytes at least, then powers of two up to 4 KiB, then multiples of 4 KiB), so
//! a sealed prompt tells no more of its length than its class. Fields sealed before padding
//! (`sf1.`) still open.
//!
//! A blind index is `bi1.` then base64 of HMAC-SHA256(field name, 0, value) under a key
//! derived from the keyring's index key: equal values give equal indexes, and nothing else
//! can be learnt from one without the key.

use super::{Keyring, MasterKeyId, MasterKeys, SealError};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

/// What every sealed field starts with.
pub const PREFIX: &str = "sf2.";
/// What fields sealed before padding start with.
const UNPADDED_PREFIX: &str = "sf1.";

/// The size a value of `len` bytes (with its 4-byte length) is padded to.
pub fn padded_len(len: usize) -> usize {
    let framed = len.saturating_add(4);
    if framed <= 4096 {
        framed.next_power_of_two().max(64)
    } else {
        framed.div_ceil(4096).saturating_mul(4096)
    }
}

fn pad(plain: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let len = u32::try_from(plain.len()).map_err(|_| SealError::Malformed("a field over 4 GiB"))?;
    let mut padded = Zeroizing::new(Vec::with_capacity(padded_len(plain.len())));
    padded.extend_from_slice(&len.to_be_bytes());
    padded.extend_from_slice(plain);
    padded.resize(padded_len(plain.len()), 0);
    Ok(padded)
}

fn unpad(mut padded: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let bad = SealError::Malformed("a sealed field's padding is malformed");
    let len: [u8; 4] = padded.get(..4).and_then(|b| b.try_into().ok()).ok_or(bad)?;
    let len = u32::from_be_bytes(len) as usize;
    if padded.len() < 4 + len {
        return Err(SealError::Malformed(
            "a sealed field's padding is malformed",
        ));
    }
    padded.truncate(4 + len);
    padded.drain(..4);
    Ok(padded)
}
/// What every blind index starts with.
pub const INDEX_PREFIX: &str = "bi1.";

fn aad(field: &str, row: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(8 + field.len() + row.len());
    aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
    aad.extend_from_slice(field.as_bytes());
    aad.extend_from_slice(&(row.len() as u32).to_be_bytes());
    aad.extend_from_slice(row.as_bytes());
    aad
}

/// Seals `plain`, the value of `field` in `row`, under the keyring's active key.
pub fn seal(ring: &Keyring, field: &str, row: &str, plain: &[u8]) -> Result<String, SealError> {
    let (id, master) = ring.active();
    let key = crate::derived_key(master, b"sparkle field key v1");
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let padded = pad(plain)?;
    let sealed = Aes256Gcm::new(key.as_ref().into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &padded,
                aad: &aad(field, row),
            },
        )
        .map_err(|_| SealError::Malformed("cannot encrypt a field"))?;
    let mut bytes = Vec::with_capacity(1 + id.as_str().len() + 12 + sealed.len());
    bytes.push(id.as_str().len() as u8);
    bytes.extend_from_slice(id.as_str().as_bytes());
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&sealed);
    Ok(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

struct Parsed {
    key_id: MasterKeyId,
    bytes: Vec<u8>,
    body: usize,
    padded: bool,
}

fn parse(sealed: &str) -> Result<Parsed, SealError> {
    let (text, padded) = match sealed.strip_prefix(PREFIX) {
        Some(text) => (text, true),
        None => (
            sealed
                .strip_prefix(UNPADDED_PREFIX)
                .ok_or(SealError::NotSealed)?,
            false,
        ),
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| SealError::Malformed("a sealed field is not base64"))?;
    let id_len = usize::from(*bytes.first().ok_or(SealError::Malformed("empty field"))?);
    let id = bytes
        .get(1..1 + id_len)
        .ok_or(SealError::Malformed("field cut short"))?;
    let key_id = std::str::from_utf8(id)
        .map_err(|_| SealError::Malformed("key id is not text"))
        .and_then(MasterKeyId::new)?;
    let body = 1 + id_len;
    if bytes.len() < body + 12 + 16 {
        return Err(SealError::Malformed("field cut short"));
    }
    Ok(Parsed {
        key_id,
        bytes,
        body,
        padded,
    })
}

/// The id of the master key a field is sealed under.
pub fn key_id(sealed: &str) -> Result<MasterKeyId, SealError> {
    Ok(parse(sealed)?.key_id)
}

/// Opens a sealed value of `field` in `row`.
pub fn open(
    keys: &MasterKeys,
    field: &str,
    row: &str,
    sealed: &str,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let parsed = parse(sealed)?;
    let ring = keys.holding(&parsed.key_id);
    let key = crate::derived_key(ring.material(&parsed.key_id)?, b"sparkle field key v1");
    let (nonce, ciphertext) = parsed.bytes[parsed.body..].split_at(12);
    let plain = Aes256Gcm::new(key.as_ref().into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad(field, row),
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| SealError::Field)?;
    if parsed.padded {
        unpad(plain)
    } else {
        Ok(plain)
    }
}

/// The blind index of `value` in `field`.
pub fn blind(ring: &Keyring, field: &str, value: &[u8]) -> String {
    let key = crate::derived_key(ring.index_key(), b"sparkle blind index v1");
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key.as_ref()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes a key of any length"),
    };
    mac.update(field.as_bytes());
    mac.update(&[0]);
    mac.update(value);
    format!(
        "{INDEX_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_stay_in_their_row() {
        let keys = MasterKeys::fixed(Keyring::generate(1));
        let ring = keys.current();
        let sealed = seal(&ring, "jobs.request", "job-1", b"a corgi").expect("seal");
        assert!(sealed.starts_with(PREFIX) && !sealed.contains("corgi"));
        assert_eq!(
            open(&keys, "jobs.request", "job-1", &sealed)
                .expect("open")
                .as_slice(),
            b"a corgi"
        );
        assert_ne!(
            sealed,
            seal(&ring, "jobs.request", "job-1", b"a corgi").expect("seal")
        );
        assert!(matches!(
            open(&keys, "jobs.request", "job-2", &sealed),
            Err(SealError::Field)
        ));
        assert!(open(&keys, "jobs.group", "job-1", &sealed).is_err());
        assert_eq!(&key_id(&sealed).expect("id"), ring.active_id());
        assert!(matches!(
            open(&keys, "jobs.request", "job-1", "a corgi"),
            Err(SealError::NotSealed)
        ));
        let mut bad = sealed.clone().into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).expect("ascii");
        assert!(open(&keys, "jobs.request", "job-1", &bad).is_err());
        assert!(open(
            &MasterKeys::fixed(Keyring::generate(1)),
            "jobs.request",
            "job-1",
            &sealed
        )
        .is_err());
    }

    #[test]
    fn blind_indexes_match_equal_values_only_and_survive_rotation() {
        let mut ring = Keyring::generate(1);
        let a = blind(&ring, "jobs.group", b"discord:42");
        assert_eq!(a, blind(&ring, "jobs.group", b"discord:42"));
        assert_ne!(a, blind(&ring, "jobs.group", b"discord:43"));
        assert_ne!(a, blind(&ring, "jobs.dedup", b"discord:42"));
        assert!(!a.contains("42"));
        ring.rotate(2);
        assert_eq!(a, blind(&ring, "jobs.group", b"discord:42"));
        assert_ne!(a, blind(&Keyring::generate(1), "jobs.group", b"discord:42"));
    }

    #[test]
    fn sealed_values_tell_only_their_size_class() {
        let ring = Keyring::generate(1);
        let keys = MasterKeys::fixed(ring.clone());
        let short = seal(&ring, "jobs.request", "job-1", b"a corgi").expect("seal");
        let longer = seal(&ring, "jobs.request", "job-1", &[b'x'; 50]).expect("seal");
        assert_eq!(
            short.len(),
            longer.len(),
            "7 and 50 bytes share the 64-byte class"
        );
        let next = seal(&ring, "jobs.request", "job-1", &[b'x'; 61]).expect("seal");
        assert!(
            next.len() > short.len(),
            "61 bytes and its length need the next class"
        );
        for len in [0, 1, 59, 60, 61, 2000, 4092, 4093, 10_000] {
            let value = vec![b'p'; len];
            let sealed = seal(&ring, "jobs.request", "job-1", &value).expect("seal");
            let opened = open(&keys, "jobs.request", "job-1", &sealed).expect("open");
            assert_eq!(opened.as_slice(), value.as_slice(), "{len} bytes");
        }
        assert_eq!(
            [
                padded_len(0),
                padded_len(60),
                padded_len(61),
                padded_len(2000)
            ],
            [64, 64, 128, 2048]
        );
        assert_eq!([padded_len(4092), padded_len(4093)], [4096, 8192]);
    }

    #[test]
    fn fields_sealed_before_padding_still_open() {
        // Sealed as before: the value itself encrypted, under `sf1.`.
        let ring = Keyring::generate(1);
        let keys = MasterKeys::fixed(ring.clone());
        let (id, master) = ring.active();
        let key = crate::derived_key(master, b"sparkle field key v1");
        let nonce = [7u8; 12];
        let sealed = Aes256Gcm::new(key.as_ref().into())
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: b"an old prompt",
                    aad: &aad("jobs.request", "job-1"),
                },
            )
            .expect("encrypt");
        let mut bytes = vec![id.as_str().len() as u8];
        bytes.extend_from_slice(id.as_str().as_bytes());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        let old = format!("sf1.{}", URL_SAFE_NO_PAD.encode(bytes));
        assert_eq!(
            open(&keys, "jobs.request", "job-1", &old)
                .expect("open")
                .as_slice(),
            b"an old prompt"
        );
        assert_eq!(&key_id(&old).expect("id"), ring.active_id());
    }
}
