//! Sealed fields: what the database must not hold in the clear. Prompts (the whole
//! request), users' fairness groups, what a reply needs to reach its destination (an
//! interaction token, a webhook URL), what a reply last showed (it may quote the prompt) and
//! webhook signing secrets are sealed before they are written and opened after they are read.
//! Values the queue compares (a group, an idempotency key, a request fingerprint) are stored
//! as blind indexes, keyed hashes under which equal values stay equal.
//!
//! The queue is handed a [`FieldCipher`] and knows nothing of keys or key files: the binary
//! gives it one over the deployment's keyring.

use zeroize::Zeroizing;

/// A column holding sealed values or blind indexes. Its name is bound into every sealed
/// value, so a value copied into another column does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `jobs.request`: the request, prompt and negative prompt included (sealed).
    JobRequest,
    /// `jobs.group_sealed` (sealed) and `jobs.group_key`, `groups.name` (blind index).
    JobGroup,
    /// `jobs.dedup_key`: the client's idempotency key (blind index).
    JobDedup,
    /// `jobs.request_hash`: the request's fingerprint (blind index).
    JobFingerprint,
    /// `jobs.error_detail`: why an attempt failed, in detail (sealed).
    JobErrorDetail,
    /// `deliveries.payload`: what a reply channel needs to answer (sealed).
    ReplyPayload,
    /// `deliveries.state`: what a reply channel last sent (sealed).
    ReplyState,
    /// `api_keys.webhook_secret` and `webhook_secret_previous`: the key's webhook signing
    /// secrets (sealed).
    WebhookSecret,
    /// `api_keys.row_tag`: a keyed MAC over what a key row grants (blind index), so that a
    /// row written past the service (a minted or widened key) does not authenticate.
    ApiKeyRow,
    /// `sessions.row_tag`: a keyed MAC over what a browser session grants (blind index).
    SessionRow,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::JobRequest => "jobs.request",
            Field::JobGroup => "jobs.group",
            Field::JobDedup => "jobs.dedup_key",
            Field::JobFingerprint => "jobs.request_hash",
            Field::JobErrorDetail => "jobs.error_detail",
            Field::ReplyPayload => "deliveries.payload",
            Field::ReplyState => "deliveries.state",
            Field::WebhookSecret => "api_keys.webhook_secret",
            Field::ApiKeyRow => "api_keys.row",
            Field::SessionRow => "sessions.row",
        }
    }
}

/// Why a value could not be sealed or opened. Never carries the value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FieldError(pub String);

/// Seals and opens field values and makes blind indexes; given to the queue at construction.
pub trait FieldCipher: Send + Sync + 'static {
    /// Seals `plain`, the value of `field` in the row identified by `row`, as text.
    fn seal(&self, field: Field, row: &str, plain: &[u8]) -> Result<String, FieldError>;
    /// Opens what [`seal`](FieldCipher::seal) made for the same field and row.
    fn open(&self, field: Field, row: &str, sealed: &str)
        -> Result<Zeroizing<Vec<u8>>, FieldError>;
    /// A keyed hash of `value`: equal values, equal indexes; stable across key rotations.
    fn blind(&self, field: Field, value: &[u8]) -> String;
    /// The id of the key a sealed value is under, `None` if it is not a sealed value.
    fn key_of(&self, sealed: &str) -> Option<String>;
    /// The id of the key new values are sealed under.
    fn active_key(&self) -> String;
}

/// How many sealed values each key holds, and how many values are not sealed at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldKeyUsage {
    pub by_key: std::collections::BTreeMap<String, u64>,
    pub unsealed: u64,
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::sync::{Arc, Mutex};

    pub fn test_cipher() -> Arc<dyn FieldCipher> {
        Arc::new(TestCipher::default())
    }

    /// A stand-in for the queue's own tests: not secret (hex with the field and row in
    /// front), but it checks that every value goes through it for the right field and row,
    /// and leaves no plaintext in the file. Its key can be switched to rehearse rotation.
    pub struct TestCipher {
        key: Mutex<String>,
    }

    impl Default for TestCipher {
        fn default() -> Self {
            TestCipher {
                key: Mutex::new("k1".into()),
            }
        }
    }

    impl TestCipher {
        pub fn switch_to(&self, key: &str) {
            if let Ok(mut k) = self.key.lock() {
                *k = key.to_string();
            }
        }
    }

    impl FieldCipher for TestCipher {
        fn seal(&self, field: Field, row: &str, plain: &[u8]) -> Result<String, FieldError> {
            Ok(format!(
                "t.{}.{}.{}",
                self.active_key(),
                hex::encode(format!("{}|{row}", field.name())),
                hex::encode(plain)
            ))
        }

        fn open(
            &self,
            field: Field,
            row: &str,
            sealed: &str,
        ) -> Result<Zeroizing<Vec<u8>>, FieldError> {
            let parts: Vec<&str> = sealed.split('.').collect();
            let ["t", _key, bound, value] = parts.as_slice() else {
                return Err(FieldError("not sealed".into()));
            };
            if *bound != hex::encode(format!("{}|{row}", field.name())) {
                return Err(FieldError("sealed for another field or row".into()));
            }
            hex::decode(value)
                .map(Zeroizing::new)
                .map_err(|_| FieldError("bad value".into()))
        }

        fn blind(&self, field: Field, value: &[u8]) -> String {
            let mut digest = Sha256::new();
            digest.update(field.name());
            digest.update([0]);
            digest.update(value);
            format!("b.{}", hex::encode(digest.finalize()))
        }

        fn key_of(&self, sealed: &str) -> Option<String> {
            let mut parts = sealed.split('.');
            match (parts.next(), parts.next()) {
                (Some("t"), Some(key)) => Some(key.to_string()),
                _ => None,
            }
        }

        fn active_key(&self) -> String {
            self.key.lock().map(|k| k.clone()).unwrap_or_default()
        }
    }
}
