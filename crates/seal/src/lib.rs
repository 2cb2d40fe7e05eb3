//! Encryption at rest, in one place: the keyring's master keys, sealed images, sealed
//! database fields and blind indexes. Only the control plane uses it (gateways and the
//! commands that rotate keys); workers never hold a key of it.
//!
//! The names, since "key" means many things in a service like this one:
//! - a *master key* ([`MasterKey`], named by a [`MasterKeyId`]) lives in the [`Keyring`], a
//!   file the operator keeps (its text: [`text`]; where it lives and who may read it: the
//!   binary). One master key is active; older ones keep opening what they sealed until they
//!   are retired. [`MasterKeys`] is a running service's hold on the keyring, reloaded when
//!   another process rotates it.
//! - a *data key* is random, one per sealed object: it encrypts the object's chunks and is
//!   stored in the object's header wrapped (AES-256-GCM) by the active master key, with that
//!   key's id. Rotating master keys only rewrites headers: [`rewrap`] unwraps the data key
//!   with the old master key and wraps it with the new one, leaving the chunks as they are.
//! - a *field key* is derived (HKDF-SHA256, [`derived_key`]) from a master key; database
//!   fields are small and are sealed directly under it, with the master key's id in front
//!   ([`field`]). Links to images and worker tokens are MACs under keys derived the same way
//!   for their own purposes ([`derived_mac`]).
//! - the *index key* makes blind indexes: keyed hashes the database compares (a user's
//!   fairness group, an idempotency key). Rotation leaves it alone, so equal values still
//!   match across rotations.
//!
//! Not here: *API keys* (bearer secrets of API clients, stored hashed by the queue),
//! *enrollment secrets* and *worker tokens* (what workers present), the Discord
//! application's *public key* (which verifies Discord's signatures).

mod derive;
pub mod field;
mod keyring;
mod object;
pub mod text;

pub use derive::{derived_key, derived_mac};
pub use keyring::{KeyMaterial, KeySource, Keyring, MasterKey, MasterKeyId, MasterKeys};
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
    UnknownKey(MasterKeyId),
    #[error("sealed under master key {0}, which has been retired")]
    RetiredKey(MasterKeyId),
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
