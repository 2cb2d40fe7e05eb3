//! Encryption at rest: every image is sealed before it reaches a store, and the sensitive
//! fields of the metadata database are sealed with the same keys.
//!
//! The key hierarchy has two levels. *Master keys* live in a [`Keyring`] (a file the operator
//! keeps; see the binary); each has a short [`KeyId`] and one of them is active. Every object
//! gets its own random 256-bit *data key*, which encrypts the object's chunks and is stored in
//! the object's header wrapped (AES-256-GCM) by the active master key, together with that
//! key's id. Rotating master keys therefore only rewrites headers: [`rewrap`] unwraps the data
//! key with the old master key and wraps it with the new one, leaving the chunks as they are.
//!
//! Database fields are small, so they are sealed directly under a key derived (HKDF-SHA256)
//! from a master key, with the master key's id in front ([`field`]). Where the database must
//! compare values (a user's fairness group, an idempotency key) it stores a keyed hash, a
//! *blind index*, under a separate index key of the keyring that rotation leaves alone, so
//! equal values still match across rotations.
//!
//! Nothing here reads files or knows where keys come from: the binary loads the keyring and
//! hands it over as [`Keys`], which can reload it when another process has rotated keys.

pub mod field;
mod keyring;
mod object;

pub use keyring::{KeyId, KeyMaterial, KeySource, Keyring, Keys, MasterKey};
pub use object::{header_key_id, open, rewrap, seal, CHUNK_SIZE, HEADER_MAX, MAGIC, VERSION};

/// Why something could not be sealed or opened. No variant ever carries key material or
/// the plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed object (no Sparkle header)")]
    NotSealed,
    #[error("sealed with format version {0}, which this build cannot read")]
    UnsupportedVersion(u8),
    #[error("malformed sealed data: {0}")]
    Malformed(&'static str),
    #[error("sealed under master key {0}, which is not in the keyring")]
    UnknownKey(KeyId),
    #[error("sealed under master key {0}, which has been retired")]
    RetiredKey(KeyId),
    #[error("the data key does not unwrap: wrong master key, a changed header, or an object moved from another name")]
    Unwrap,
    #[error("chunk {0} does not authenticate: the object was changed, truncated or reordered")]
    Chunk(u64),
    #[error(
        "a sealed field does not authenticate: wrong key, changed value, or moved from another row"
    )]
    Field,
    #[error("invalid key id {0:?}: 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    InvalidKeyId(String),
    #[error("keyring: {0}")]
    Keyring(String),
}
