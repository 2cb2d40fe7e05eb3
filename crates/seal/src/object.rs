//! The sealed object format, version 1. All integers are big-endian.
//!
//! ```text
//! header   magic "SPKS" (4) | version 1 (1) | chunk size as log2 (1)
//!          | key id length n (1) | key id (n, ASCII) | nonce prefix (8)
//!          | wrap nonce (12) | wrapped data key (32 + 16-byte tag)
//! body     chunk 0 | chunk 1 | … | chunk k-1        (k >= 1)
//! chunk i  AES-256-GCM under the data key of up to `chunk size` bytes, + 16-byte tag;
//!          nonce = nonce prefix | i (4); AAD = object name length (4) | object name | last (1)
//! ```
//!
//! The data key is wrapped by the master key named in the header (AES-256-GCM with AAD =
//! every header byte before the wrap nonce, then the object name), so any change to the
//! header, and any object presented under another name, fails to unwrap. Every chunk but the
//! last is full; the last carries `last = 1` in its AAD, and an empty object is one empty
//! last chunk. So a flipped bit, a dropped or reordered chunk, a truncation or an extension
//! all fail to authenticate.

use super::{Keyring, MasterKeyId, MasterKeys, SealError};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 4] = b"SPKS";
pub const VERSION: u8 = 1;
/// Plaintext bytes per chunk.
pub const CHUNK_SIZE: usize = 1 << CHUNK_LOG2;
const CHUNK_LOG2: u8 = 16;
const TAG: usize = 16;
const PREFIX: usize = 8;
const WRAP_NONCE: usize = 12;
const WRAPPED_KEY: usize = 32 + TAG;
/// The most bytes a header can take: enough to read to learn an object's key id.
pub const HEADER_MAX: usize = 4 + 1 + 1 + 1 + 64 + PREFIX + WRAP_NONCE + WRAPPED_KEY;

/// A parsed header, borrowing the sealed bytes.
struct Header<'a> {
    key_id: MasterKeyId,
    chunk_size: usize,
    /// Every header byte before the wrap nonce: authenticated by the key wrap.
    bound: &'a [u8],
    nonce_prefix: [u8; PREFIX],
    wrap_nonce: &'a [u8],
    wrapped_key: &'a [u8],
    /// The header's length: where the body starts.
    len: usize,
}

fn parse_header(sealed: &[u8]) -> Result<Header<'_>, SealError> {
    if sealed.len() < 4 || &sealed[..4] != MAGIC {
        return Err(SealError::NotSealed);
    }
    let short = || SealError::Malformed("header cut short");
    let version = *sealed.get(4).ok_or_else(short)?;
    if version != VERSION {
        return Err(SealError::UnsupportedVersion(version));
    }
    let chunk_log2 = *sealed.get(5).ok_or_else(short)?;
    if !(10..=24).contains(&chunk_log2) {
        return Err(SealError::Malformed("chunk size out of range"));
    }
    let id_len = usize::from(*sealed.get(6).ok_or_else(short)?);
    let id_end = 7 + id_len;
    let id = sealed.get(7..id_end).ok_or_else(short)?;
    let key_id = std::str::from_utf8(id)
        .map_err(|_| SealError::Malformed("key id is not text"))
        .and_then(MasterKeyId::new)?;
    let prefix_end = id_end + PREFIX;
    let wrap_nonce_end = prefix_end + WRAP_NONCE;
    let len = wrap_nonce_end + WRAPPED_KEY;
    if sealed.len() < len {
        return Err(short());
    }
    let mut nonce_prefix = [0u8; PREFIX];
    nonce_prefix.copy_from_slice(&sealed[id_end..prefix_end]);
    Ok(Header {
        key_id,
        chunk_size: 1 << chunk_log2,
        bound: &sealed[..prefix_end],
        nonce_prefix,
        wrap_nonce: &sealed[prefix_end..wrap_nonce_end],
        wrapped_key: &sealed[wrap_nonce_end..len],
        len,
    })
}

/// The id of the master key an object is sealed under, from its first bytes
/// (at most [`HEADER_MAX`] are needed).
pub fn header_key_id(sealed_start: &[u8]) -> Result<MasterKeyId, SealError> {
    if sealed_start.len() < 4 || &sealed_start[..4] != MAGIC {
        return Err(SealError::NotSealed);
    }
    let short = || SealError::Malformed("header cut short");
    let version = *sealed_start.get(4).ok_or_else(short)?;
    if version != VERSION {
        return Err(SealError::UnsupportedVersion(version));
    }
    let id_len = usize::from(*sealed_start.get(6).ok_or_else(short)?);
    let id = sealed_start.get(7..7 + id_len).ok_or_else(short)?;
    std::str::from_utf8(id)
        .map_err(|_| SealError::Malformed("key id is not text"))
        .and_then(MasterKeyId::new)
}

fn wrap_aad(bound: &[u8], name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(bound.len() + name.len());
    aad.extend_from_slice(bound);
    aad.extend_from_slice(name.as_bytes());
    aad
}

fn chunk_aad(name: &str, last: bool) -> Vec<u8> {
    let mut aad = Vec::with_capacity(4 + name.len() + 1);
    aad.extend_from_slice(&(name.len() as u32).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.push(u8::from(last));
    aad
}

fn chunk_nonce(prefix: &[u8; PREFIX], index: u64) -> Result<[u8; 12], SealError> {
    let counter =
        u32::try_from(index).map_err(|_| SealError::Malformed("too many chunks for one object"))?;
    let mut nonce = [0u8; 12];
    nonce[..PREFIX].copy_from_slice(prefix);
    nonce[PREFIX..].copy_from_slice(&counter.to_be_bytes());
    Ok(nonce)
}

/// A header for `key_id` with a fresh data key wrapped by `master`, bound to `name`.
fn write_header(
    out: &mut Vec<u8>,
    key_id: &MasterKeyId,
    master: &super::KeyMaterial,
    nonce_prefix: &[u8; PREFIX],
    data_key: &[u8; 32],
    name: &str,
) -> Result<(), SealError> {
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(CHUNK_LOG2);
    // `MasterKeyId` is 1 to 64 ASCII bytes.
    out.push(key_id.as_str().len() as u8);
    out.extend_from_slice(key_id.as_str().as_bytes());
    out.extend_from_slice(nonce_prefix);
    let mut wrap_nonce = [0u8; WRAP_NONCE];
    rand::rngs::OsRng.fill_bytes(&mut wrap_nonce);
    let wrapper = Aes256Gcm::new(master.bytes().into());
    let wrapped = wrapper
        .encrypt(
            Nonce::from_slice(&wrap_nonce),
            Payload {
                msg: data_key,
                aad: &wrap_aad(out, name),
            },
        )
        .map_err(|_| SealError::Malformed("cannot wrap a data key"))?;
    out.extend_from_slice(&wrap_nonce);
    out.extend_from_slice(&wrapped);
    Ok(())
}

/// Seals `plain` as the object called `name` under the keyring's active key.
pub fn seal(ring: &Keyring, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
    let (key_id, master) = ring.active();
    let mut data_key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(data_key.as_mut());
    let mut nonce_prefix = [0u8; PREFIX];
    rand::rngs::OsRng.fill_bytes(&mut nonce_prefix);
    let chunks = plain.len().div_ceil(CHUNK_SIZE).max(1);
    let mut out = Vec::with_capacity(HEADER_MAX + plain.len() + chunks * TAG);
    write_header(&mut out, key_id, master, &nonce_prefix, &data_key, name)?;
    let cipher = Aes256Gcm::new(data_key.as_ref().into());
    for index in 0..chunks {
        let start = index * CHUNK_SIZE;
        let piece = &plain[start.min(plain.len())..(start + CHUNK_SIZE).min(plain.len())];
        let last = index + 1 == chunks;
        let nonce = chunk_nonce(&nonce_prefix, index as u64)?;
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: piece,
                    aad: &chunk_aad(name, last),
                },
            )
            .map_err(|_| SealError::Malformed("cannot encrypt a chunk"))?;
        out.extend_from_slice(&sealed);
    }
    Ok(out)
}

fn unwrap_data_key(
    header: &Header<'_>,
    ring: &Keyring,
    name: &str,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let master = ring.material(&header.key_id)?;
    let wrapper = Aes256Gcm::new(master.bytes().into());
    let key = wrapper
        .decrypt(
            Nonce::from_slice(header.wrap_nonce),
            Payload {
                msg: header.wrapped_key,
                aad: &wrap_aad(header.bound, name),
            },
        )
        .map_err(|_| SealError::Unwrap)?;
    let key = Zeroizing::new(key);
    if key.len() != 32 {
        return Err(SealError::Unwrap);
    }
    Ok(key)
}

/// Opens the object called `name`: its plaintext, or an error if anything about it is not
/// exactly as sealed.
pub fn open(keys: &MasterKeys, name: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    let header = parse_header(sealed)?;
    let ring = keys.holding(&header.key_id);
    let data_key = unwrap_data_key(&header, &ring, name)?;
    let cipher = Aes256Gcm::new(data_key.as_slice().into());
    let body = &sealed[header.len..];
    let segment = header.chunk_size + TAG;
    if body.len() < TAG {
        return Err(SealError::Chunk(0));
    }
    let chunks = body.len().div_ceil(segment);
    let mut plain = Vec::with_capacity(body.len() - chunks * TAG);
    for (index, piece) in body.chunks(segment).enumerate() {
        let index = index as u64;
        let last = index + 1 == chunks as u64;
        let nonce = chunk_nonce(&header.nonce_prefix, index)?;
        let opened = cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: piece,
                    aad: &chunk_aad(name, last),
                },
            )
            .map_err(|_| SealError::Chunk(index))?;
        plain.extend_from_slice(&opened);
    }
    Ok(plain)
}

/// The object with its data key wrapped by the keyring's active key instead: a new header
/// and the very same chunks. `None` when it already is under the active key.
pub fn rewrap(ring: &Keyring, name: &str, sealed: &[u8]) -> Result<Option<Vec<u8>>, SealError> {
    let header = parse_header(sealed)?;
    let (active_id, active) = ring.active();
    if &header.key_id == active_id {
        return Ok(None);
    }
    let data_key = unwrap_data_key(&header, ring, name)?;
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&data_key);
    let body = &sealed[header.len..];
    let mut out = Vec::with_capacity(HEADER_MAX + body.len());
    write_header(
        &mut out,
        active_id,
        active,
        &header.nonce_prefix,
        &key,
        name,
    )?;
    out.extend_from_slice(body);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "images/0b5c/0.png";

    fn keys() -> MasterKeys {
        MasterKeys::fixed(Keyring::generate(1))
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn header_len(sealed: &[u8]) -> usize {
        parse_header(sealed).expect("header").len
    }

    #[test]
    fn objects_of_every_shape_round_trip() {
        let keys = keys();
        for len in [
            0,
            1,
            1000,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE,
            3 * CHUNK_SIZE + 17,
        ] {
            let plain = sample(len);
            let sealed = seal(&keys.current(), NAME, &plain).expect("seal");
            let chunks = len.div_ceil(CHUNK_SIZE).max(1);
            assert_eq!(
                sealed.len(),
                header_len(&sealed) + len + chunks * TAG,
                "{len} bytes: one tag per chunk"
            );
            assert_eq!(open(&keys, NAME, &sealed).expect("open"), plain, "{len}");
            assert_eq!(
                &header_key_id(&sealed[..HEADER_MAX.min(sealed.len())]).expect("id"),
                keys.current().active_id()
            );
        }
    }

    #[test]
    fn sealing_twice_gives_different_bytes() {
        let keys = keys();
        let a = seal(&keys.current(), NAME, b"same").expect("seal");
        let b = seal(&keys.current(), NAME, b"same").expect("seal");
        assert_ne!(a, b);
        assert!(!a.windows(4).any(|w| w == b"same"));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let keys = keys();
        // Two chunks, the second short, so header, full and last chunk are all covered.
        let plain = sample(CHUNK_SIZE + 100);
        let sealed = seal(&keys.current(), NAME, &plain).expect("seal");
        let header = header_len(&sealed);
        let mut positions: Vec<usize> = (0..header).collect();
        positions.extend((header..sealed.len()).step_by(997));
        positions.extend([header + CHUNK_SIZE + TAG - 1, sealed.len() - 1]);
        for at in positions {
            for bit in [0, 7] {
                let mut bad = sealed.clone();
                bad[at] ^= 1 << bit;
                assert!(
                    open(&keys, NAME, &bad).is_err(),
                    "bit {bit} of byte {at} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_extension_and_reordering_are_refused() {
        let keys = keys();
        let plain = sample(3 * CHUNK_SIZE);
        let sealed = seal(&keys.current(), NAME, &plain).expect("seal");
        let header = header_len(&sealed);
        let segment = CHUNK_SIZE + TAG;
        for cut in [
            0,
            3,
            header - 1,
            header,
            header + 10,
            header + segment,
            header + 2 * segment,
            sealed.len() - 1,
        ] {
            assert!(
                open(&keys, NAME, &sealed[..cut]).is_err(),
                "cut at {cut} went unnoticed"
            );
        }
        let mut longer = sealed.clone();
        longer.extend_from_slice(&sealed[header..header + segment]);
        assert!(matches!(
            open(&keys, NAME, &longer),
            Err(SealError::Chunk(_))
        ));
        let mut swapped = sealed[..header].to_vec();
        swapped.extend_from_slice(&sealed[header + segment..header + 2 * segment]);
        swapped.extend_from_slice(&sealed[header..header + segment]);
        swapped.extend_from_slice(&sealed[header + 2 * segment..]);
        assert!(matches!(
            open(&keys, NAME, &swapped),
            Err(SealError::Chunk(0))
        ));
        // An empty object is one empty last chunk: dropping it is noticed too.
        let empty = seal(&keys.current(), NAME, b"").expect("seal");
        assert!(open(&keys, NAME, &empty[..header_len(&empty)]).is_err());
    }

    #[test]
    fn an_object_does_not_open_under_another_name_or_key() {
        let keys = keys();
        let sealed = seal(&keys.current(), NAME, b"pixels").expect("seal");
        assert!(matches!(
            open(&keys, "images/0b5c/1.png", &sealed),
            Err(SealError::Unwrap)
        ));
        let other = MasterKeys::fixed(Keyring::generate(1));
        assert!(matches!(
            open(&other, NAME, &sealed),
            Err(SealError::UnknownKey(_))
        ));
        // A keyring with a key of the same id but other material.
        let id = keys.current().active_id().clone();
        let impostor = Keyring::from_parts(
            vec![super::super::MasterKey::live(
                id.clone(),
                1,
                super::super::KeyMaterial::random(),
            )],
            id,
            super::super::KeyMaterial::random(),
        )
        .expect("keyring");
        assert!(matches!(
            open(&MasterKeys::fixed(impostor), NAME, &sealed),
            Err(SealError::Unwrap)
        ));
        assert!(matches!(
            open(&keys, NAME, b"\x89PNG\r\n\x1a\n"),
            Err(SealError::NotSealed)
        ));
        let mut future = sealed.clone();
        future[4] = 2;
        assert!(matches!(
            open(&keys, NAME, &future),
            Err(SealError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn rewrapping_changes_only_the_header_and_old_keys_open_until_retired() {
        let mut ring = Keyring::generate(1);
        let first = ring.active_id().clone();
        let plain = sample(2 * CHUNK_SIZE + 5);
        let sealed = seal(&ring, NAME, &plain).expect("seal");
        let old_header = header_len(&sealed);
        ring.rotate(2);
        let keys = MasterKeys::fixed(ring.clone());
        assert_eq!(
            open(&keys, NAME, &sealed).expect("old key still opens"),
            plain
        );
        let rewrapped = rewrap(&ring, NAME, &sealed)
            .expect("rewrap")
            .expect("was under the old key");
        let new_header = header_len(&rewrapped);
        assert_eq!(
            &rewrapped[new_header..],
            &sealed[old_header..],
            "the chunks are not re-encrypted"
        );
        assert_eq!(&header_key_id(&rewrapped).expect("id"), ring.active_id());
        assert!(rewrap(&ring, NAME, &rewrapped).expect("rewrap").is_none());
        assert!(
            rewrap(&ring, "images/x/0.png", &sealed).is_err(),
            "name bound"
        );
        ring.retire(&first, 3).expect("retire");
        let keys = MasterKeys::fixed(ring);
        assert_eq!(open(&keys, NAME, &rewrapped).expect("open"), plain);
        assert!(matches!(
            open(&keys, NAME, &sealed),
            Err(SealError::RetiredKey(_))
        ));
    }
}
