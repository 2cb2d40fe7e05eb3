//! API keys: 256-bit random secrets, shown once, stored only as their SHA-256 hash.
//!
//! A key's secret has 256 bits of entropy, so a single fast hash is enough to make the
//! stored value useless to a thief. A presented secret is hashed and the hash looked up by
//! index: how long the lookup takes depends on the hash of the guess, which says nothing
//! about how close the guess was to a real secret. The row found is then compared with the
//! hash again in constant time, so no byte-by-byte comparison of secret-derived values ever
//! depends on where they differ.

use crate::fields::{Field, FieldCipher};
use crate::{QueueError, SqliteQueue};
use async_trait::async_trait;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::fmt;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const SECRET_PREFIX: &str = "spk_";

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Submit generation requests.
    Generate,
    /// Read jobs and images.
    Read,
    /// Everything, including administration (but not [`Scope::Worker`]).
    Admin,
    /// Enrollment of workers: exchanged for worker tokens on the worker listener, and good
    /// for nothing else. Never implied by another scope.
    Worker,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Generate => "generate",
            Scope::Read => "read",
            Scope::Admin => "admin",
            Scope::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s.trim() {
            "generate" => Some(Scope::Generate),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            "worker" => Some(Scope::Worker),
            _ => None,
        }
    }
}

/// A key as stored: never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at_ms: i64,
    pub revoked: bool,
}

impl ApiKey {
    pub fn allows(&self, scope: Scope) -> bool {
        let admin = scope != Scope::Worker && self.scopes.contains(&Scope::Admin);
        !self.revoked && (self.scopes.contains(&scope) || admin)
    }
}

/// A key's secret, zeroed on drop and never printed by `Debug`.
pub struct KeySecret(Zeroizing<String>);

impl KeySecret {
    /// The secret itself, to show the user exactly once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySecret(<redacted>)")
    }
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[async_trait]
pub trait ApiKeys: Send + Sync + 'static {
    /// Creates a key; the secret is returned here and never again.
    async fn create_key(
        &self,
        name: &str,
        scopes: &[Scope],
    ) -> Result<(ApiKey, KeySecret), QueueError>;
    /// The live key this secret belongs to, if any.
    async fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>, QueueError>;
    async fn list_keys(&self) -> Result<Vec<ApiKey>, QueueError>;
    /// Revokes a key by id; false if there is no such key.
    async fn revoke_key(&self, id: &str) -> Result<bool, QueueError>;
    /// Makes `secret` the key's webhook signing secret; the secret it replaces keeps
    /// signing beside it for `grace`. False if there is no such live key.
    async fn set_webhook_secret(
        &self,
        id: &str,
        secret: &[u8],
        grace: std::time::Duration,
    ) -> Result<bool, QueueError>;
    /// The secrets that sign the key's webhooks now: the current one first, then the one
    /// it replaced while its grace lasts. Empty when the key has none.
    async fn webhook_secrets(&self, id: &str) -> Result<Vec<Zeroizing<Vec<u8>>>, QueueError>;
    /// Opens a browser session for the live key `key_id`, ending at `expires_at_ms`; the
    /// secret is returned here and never again. `None` when the key is not live. A key keeps
    /// at most [`MAX_SESSIONS_PER_KEY`] sessions: opening one more ends its oldest.
    async fn open_session(
        &self,
        key_id: &str,
        expires_at_ms: i64,
    ) -> Result<Option<SessionSecret>, QueueError>;
    /// The session this secret opens, while it lasts and its key is live.
    async fn session(&self, secret: &str) -> Result<Option<Session>, QueueError>;
    /// Ends the session this secret opens; false when there was none.
    async fn end_session(&self, secret: &str) -> Result<bool, QueueError>;
}

const SESSION_PREFIX: &str = "sps_";

/// Most browser sessions one key keeps open.
pub const MAX_SESSIONS_PER_KEY: i64 = 16;

/// A browser session's secret (the cookie's value), zeroed on drop and never printed.
pub struct SessionSecret(Zeroizing<String>);

impl SessionSecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

/// A live browser session: the key it acts as, and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub key: ApiKey,
    pub expires_at_ms: i64,
}

/// A session row's columns, as stored.
pub(crate) struct SessionRow {
    pub hash: String,
    pub key_id: String,
    pub created_at: i64,
    pub expires_at: i64,
}

impl SessionRow {
    /// A new session's secret and row.
    pub fn new(key_id: &str, now_ms: i64, expires_at_ms: i64) -> (SessionSecret, SessionRow) {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        let secret = SessionSecret(Zeroizing::new(format!(
            "{SESSION_PREFIX}{}",
            hex::encode(bytes.as_ref())
        )));
        let row = SessionRow {
            hash: hash_secret(secret.expose()),
            key_id: key_id.to_string(),
            created_at: now_ms,
            expires_at: expires_at_ms,
        };
        (secret, row)
    }

    /// The MAC over what the row grants, under the keyring's index key.
    pub fn tag(&self, fields: &dyn FieldCipher) -> String {
        let mut bytes = Vec::new();
        for part in [&self.hash, &self.key_id] {
            bytes.extend_from_slice(&(part.len() as u32).to_be_bytes());
            bytes.extend_from_slice(part.as_bytes());
        }
        bytes.extend_from_slice(&self.created_at.to_be_bytes());
        bytes.extend_from_slice(&self.expires_at.to_be_bytes());
        fields.blind(Field::SessionRow, &bytes)
    }

    /// Whether the stored tag is this row's, refusing (and reporting) a row that is not.
    pub fn verifies(&self, fields: &dyn FieldCipher, tag: &str) -> bool {
        let genuine = hash_matches(tag, &self.tag(fields));
        if !genuine {
            tracing::error!(
                key = %self.key_id,
                "a session row does not verify under the keyring (written past the service, \
                 or altered): refused"
            );
        }
        genuine
    }
}

/// The session, when its row verifies, has not ended and its key's row verifies and is live.
pub(crate) fn live_session(
    fields: &dyn FieldCipher,
    presented: &str,
    (row, tag): (SessionRow, String),
    key: Option<KeyRow>,
    now_ms: i64,
) -> Option<Session> {
    if !hash_matches(&row.hash, presented)
        || !row.verifies(fields, &tag)
        || row.expires_at <= now_ms
    {
        return None;
    }
    let key = key.filter(|k| k.id == row.key_id)?.verified(fields)?;
    (!key.revoked).then_some(Session {
        key,
        expires_at_ms: row.expires_at,
    })
}

/// Every column of `sessions` a session lookup reads.
pub(crate) const SESSION_COLUMNS: &str = "hash, key_id, created_at, expires_at, row_tag";

/// The hash to look a presented session secret up by, `None` when it cannot be one.
pub(crate) fn presented_session_hash(secret: &str) -> Option<String> {
    secret
        .starts_with(SESSION_PREFIX)
        .then(|| hash_secret(secret))
}

/// Every column of `api_keys` a [`KeyRow`] reads.
pub(crate) const KEY_COLUMNS: &str = "id, name, hash, scopes, created_at, revoked_at, row_tag";

fn key_row(row: &sqlx::sqlite::SqliteRow) -> Result<KeyRow, QueueError> {
    Ok(KeyRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        hash: row.try_get("hash")?,
        scopes: row.try_get("scopes")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
        tag: row.try_get("row_tag")?,
    })
}

/// A key row's columns, as read.
pub(crate) struct KeyRow {
    pub id: String,
    pub name: String,
    pub hash: String,
    pub scopes: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub tag: Option<String>,
}

impl KeyRow {
    /// The MAC over everything the row grants, each part framed by its length, under the
    /// keyring's index key: only the service holding the keyring makes a row that verifies.
    pub fn expected_tag(&self, fields: &dyn FieldCipher, revoked_at: Option<i64>) -> String {
        let mut bytes = Vec::new();
        for part in [&self.id, &self.name, &self.hash, &self.scopes] {
            bytes.extend_from_slice(&(part.len() as u32).to_be_bytes());
            bytes.extend_from_slice(part.as_bytes());
        }
        bytes.extend_from_slice(&self.created_at.to_be_bytes());
        bytes.extend_from_slice(&revoked_at.unwrap_or(-1).to_be_bytes());
        fields.blind(Field::ApiKeyRow, &bytes)
    }

    /// The key, if its row verifies; a row that does not is refused and reported.
    pub fn verified(self, fields: &dyn FieldCipher) -> Option<ApiKey> {
        let expected = self.expected_tag(fields, self.revoked_at);
        let genuine = self
            .tag
            .as_deref()
            .is_some_and(|tag| hash_matches(tag, &expected));
        if !genuine {
            tracing::error!(
                key = %self.id,
                "an API key row does not verify under the keyring (written past the service, \
                 or altered): refused"
            );
            return None;
        }
        Some(ApiKey {
            id: self.id,
            name: self.name,
            scopes: self.scopes.split(',').filter_map(Scope::parse).collect(),
            created_at_ms: self.created_at,
            revoked: self.revoked_at.is_some(),
        })
    }
}

/// A new key and its secret, with what is stored of them: the secret's hash and the scopes
/// as one text.
pub(crate) fn new_key(name: &str, scopes: &[Scope], now_ms: i64) -> (ApiKey, KeySecret, KeyRow) {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    let secret = KeySecret(Zeroizing::new(format!(
        "{SECRET_PREFIX}{}",
        hex::encode(bytes.as_ref())
    )));
    let key = ApiKey {
        id: format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
        name: name.to_string(),
        scopes: scopes.to_vec(),
        created_at_ms: now_ms,
        revoked: false,
    };
    let scope_list: Vec<_> = scopes.iter().map(|s| s.as_str()).collect();
    let row = KeyRow {
        id: key.id.clone(),
        name: key.name.clone(),
        hash: hash_secret(secret.expose()),
        scopes: scope_list.join(","),
        created_at: now_ms,
        revoked_at: None,
        tag: None,
    };
    (key, secret, row)
}

/// Tags the key rows written before rows were tagged, once: only while no row carries a
/// tag (the first start after the upgrade). From then on an untagged row is refused.
pub(crate) fn legacy_tags(fields: &dyn FieldCipher, rows: Vec<KeyRow>) -> Vec<(String, String)> {
    if rows.iter().any(|r| r.tag.is_some()) {
        return Vec::new();
    }
    rows.iter()
        .map(|r| (r.id.clone(), r.expected_tag(fields, r.revoked_at)))
        .collect()
}

/// The hash to look a presented secret up by, `None` when it cannot be a key's.
pub(crate) fn presented_hash(secret: &str) -> Option<String> {
    secret
        .starts_with(SECRET_PREFIX)
        .then(|| hash_secret(secret))
}

/// Whether the stored hash is the presented one, compared in constant time.
pub(crate) fn hash_matches(stored: &str, presented: &str) -> bool {
    bool::from(stored.as_bytes().ct_eq(presented.as_bytes()))
}

/// The webhook secrets that sign now, opened: the current one, then the previous while its
/// grace lasts.
pub(crate) fn signing_secrets(
    fields: &dyn crate::FieldCipher,
    id: &str,
    current: Option<String>,
    previous: Option<String>,
    previous_until: Option<i64>,
    now_ms: i64,
) -> Result<Vec<Zeroizing<Vec<u8>>>, QueueError> {
    let open = |sealed: &str| {
        fields
            .open(Field::WebhookSecret, id, sealed)
            .map_err(|e| QueueError::Corrupt {
                id: id.to_string(),
                reason: format!("{}: {e}", Field::WebhookSecret.name()),
            })
    };
    let mut secrets = Vec::new();
    if let Some(current) = current {
        secrets.push(open(&current)?);
    }
    if let (Some(previous), Some(until)) = (previous, previous_until) {
        if now_ms < until {
            secrets.push(open(&previous)?);
        }
    }
    Ok(secrets)
}

/// When a secret replaced now stops signing.
pub(crate) fn grace_until(now_ms: i64, grace: std::time::Duration) -> i64 {
    now_ms.saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX / 4))
}

impl SqliteQueue {
    /// Tags the key rows of a database from before rows were tagged (see [`legacy_tags`]).
    pub(crate) async fn tag_legacy_keys(&self) -> Result<(), QueueError> {
        let (_turn, mut tx) = crate::sqlite::begin_write(&self.pool, &self.write_turn).await?;
        let rows = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys"))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(key_row)
            .collect::<Result<Vec<_>, _>>()?;
        for (id, tag) in legacy_tags(&*self.fields, rows) {
            sqlx::query("UPDATE api_keys SET row_tag = ?2 WHERE id = ?1")
                .bind(id)
                .bind(tag)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl ApiKeys for SqliteQueue {
    async fn create_key(
        &self,
        name: &str,
        scopes: &[Scope],
    ) -> Result<(ApiKey, KeySecret), QueueError> {
        let (key, secret, row) = new_key(name, scopes, self.clock.now_ms());
        let tag = row.expected_tag(&*self.fields, None);
        sqlx::query(
            "INSERT INTO api_keys (id, name, hash, scopes, created_at, row_tag)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.hash)
        .bind(&row.scopes)
        .bind(row.created_at)
        .bind(tag)
        .execute(&self.pool)
        .await?;
        Ok((key, secret))
    }

    async fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>, QueueError> {
        let Some(presented) = presented_hash(secret) else {
            return Ok(None);
        };
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ?1"
        ))
        .bind(&presented)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let row = key_row(&row)?;
        if !hash_matches(&row.hash, &presented) {
            return Ok(None);
        }
        Ok(row.verified(&*self.fields).filter(|k| !k.revoked))
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            keys.extend(key_row(row)?.verified(&*self.fields));
        }
        Ok(keys)
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, QueueError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1 AND revoked_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let row = key_row(&row)?;
        let now = self.clock.now_ms();
        let tag = row.expected_tag(&*self.fields, Some(now));
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = ?2, row_tag = ?3 WHERE id = ?1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .bind(tag)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_webhook_secret(
        &self,
        id: &str,
        secret: &[u8],
        grace: std::time::Duration,
    ) -> Result<bool, QueueError> {
        let sealed = self.fields.seal(Field::WebhookSecret, id, secret)?;
        let until = grace_until(self.clock.now_ms(), grace);
        let done = sqlx::query(
            "UPDATE api_keys SET webhook_secret_previous = webhook_secret,
                webhook_previous_until = CASE WHEN webhook_secret IS NULL THEN NULL ELSE ?3 END,
                webhook_secret = ?2
             WHERE id = ?1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(&sealed)
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn webhook_secrets(&self, id: &str) -> Result<Vec<Zeroizing<Vec<u8>>>, QueueError> {
        let row = sqlx::query(
            "SELECT webhook_secret, webhook_secret_previous, webhook_previous_until FROM api_keys
             WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Vec::new());
        };
        signing_secrets(
            &*self.fields,
            id,
            row.try_get("webhook_secret")?,
            row.try_get("webhook_secret_previous")?,
            row.try_get("webhook_previous_until")?,
            self.clock.now_ms(),
        )
    }

    async fn open_session(
        &self,
        key_id: &str,
        expires_at_ms: i64,
    ) -> Result<Option<SessionSecret>, QueueError> {
        let now = self.clock.now_ms();
        let (_turn, mut tx) = crate::sqlite::begin_write(&self.pool, &self.write_turn).await?;
        let key = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"))
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await?;
        let live = match key {
            Some(row) => key_row(&row)?
                .verified(&*self.fields)
                .is_some_and(|k| !k.revoked),
            None => false,
        };
        if !live {
            return Ok(None);
        }
        let (secret, row) = SessionRow::new(key_id, now, expires_at_ms);
        sqlx::query("DELETE FROM sessions WHERE expires_at <= ?1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"
        ))
        .bind(&row.hash)
        .bind(&row.key_id)
        .bind(row.created_at)
        .bind(row.expires_at)
        .bind(row.tag(&*self.fields))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM sessions WHERE key_id = ?1 AND hash <> ?2 AND hash NOT IN (
                 SELECT hash FROM sessions WHERE key_id = ?1 AND hash <> ?2
                 ORDER BY created_at DESC, hash DESC LIMIT ?3)",
        )
        .bind(key_id)
        .bind(&row.hash)
        .bind(MAX_SESSIONS_PER_KEY - 1)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(secret))
    }

    async fn session(&self, secret: &str) -> Result<Option<Session>, QueueError> {
        let Some(presented) = presented_session_hash(secret) else {
            return Ok(None);
        };
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE hash = ?1"
        ))
        .bind(&presented)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let session = (
            SessionRow {
                hash: row.try_get("hash")?,
                key_id: row.try_get("key_id")?,
                created_at: row.try_get("created_at")?,
                expires_at: row.try_get("expires_at")?,
            },
            row.try_get("row_tag")?,
        );
        let key = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"))
            .bind(&session.0.key_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| key_row(&row))
            .transpose()?;
        Ok(live_session(
            &*self.fields,
            &presented,
            session,
            key,
            self.clock.now_ms(),
        ))
    }

    async fn end_session(&self, secret: &str) -> Result<bool, QueueError> {
        let Some(presented) = presented_session_hash(secret) else {
            return Ok(false);
        };
        let done = sqlx::query("DELETE FROM sessions WHERE hash = ?1")
            .bind(&presented)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::testing::test_cipher;
    use crate::SqliteOptions;

    #[tokio::test]
    async fn keys_are_stored_hashed_scoped_and_revocable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.db");
        let q = SqliteQueue::open(&path, &SqliteOptions::default(), test_cipher())
            .await
            .expect("open");
        let (key, secret) = q
            .create_key("ci", &[Scope::Generate])
            .await
            .expect("create");
        assert!(secret.expose().starts_with("spk_") && secret.expose().len() == 4 + 64);
        assert_eq!(format!("{secret:?}"), "KeySecret(<redacted>)");
        let found = q
            .authenticate(secret.expose())
            .await
            .expect("auth")
            .expect("known");
        assert_eq!(found.id, key.id);
        assert!(found.allows(Scope::Generate) && !found.allows(Scope::Read));
        assert!(q.authenticate("spk_0000").await.expect("auth").is_none());
        assert!(q.authenticate("").await.expect("auth").is_none());
        let stored: String = sqlx::query_scalar("SELECT hash FROM api_keys")
            .fetch_one(&q.pool)
            .await
            .expect("row");
        assert!(!stored.contains(&secret.expose()[4..]));
        assert!(q.revoke_key(&key.id).await.expect("revoke"));
        assert!(!q.revoke_key(&key.id).await.expect("revoke twice"));
        assert!(q
            .authenticate(secret.expose())
            .await
            .expect("auth")
            .is_none());
        assert!(q.list_keys().await.expect("list")[0].revoked);
    }

    #[tokio::test]
    async fn rows_written_past_the_service_do_not_authenticate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.db");
        let q = SqliteQueue::open(&path, &SqliteOptions::default(), test_cipher())
            .await
            .expect("open");
        let (key, secret) = q
            .create_key("ci", &[Scope::Generate])
            .await
            .expect("create");
        // Widened in place: refused, and no longer listed.
        sqlx::query("UPDATE api_keys SET scopes = 'admin' WHERE id = ?1")
            .bind(&key.id)
            .execute(&q.pool)
            .await
            .expect("tamper");
        assert!(q
            .authenticate(secret.expose())
            .await
            .expect("auth")
            .is_none());
        assert!(q.list_keys().await.expect("list").is_empty());
        sqlx::query("UPDATE api_keys SET scopes = 'generate' WHERE id = ?1")
            .bind(&key.id)
            .execute(&q.pool)
            .await
            .expect("restore");
        assert!(q
            .authenticate(secret.expose())
            .await
            .expect("auth")
            .is_some());
        // Minted: a row for a secret of the writer's choosing, with or without a tag.
        let minted = format!("{SECRET_PREFIX}{}", "ab".repeat(32));
        for tag in [None, Some("forged")] {
            sqlx::query(
                "INSERT INTO api_keys (id, name, hash, scopes, created_at, row_tag)
                 VALUES ('key_minted', 'root', ?1, 'admin', 0, ?2)",
            )
            .bind(hash_secret(&minted))
            .bind(tag)
            .execute(&q.pool)
            .await
            .expect("mint");
            assert!(q.authenticate(&minted).await.expect("auth").is_none());
            sqlx::query("DELETE FROM api_keys WHERE id = 'key_minted'")
                .execute(&q.pool)
                .await
                .expect("delete");
        }
        // Un-revoked behind the service's back: still refused.
        assert!(q.revoke_key(&key.id).await.expect("revoke"));
        assert!(
            q.list_keys().await.expect("list")[0].revoked,
            "a revoked row verifies"
        );
        sqlx::query("UPDATE api_keys SET revoked_at = NULL")
            .execute(&q.pool)
            .await
            .expect("un-revoke");
        assert!(q
            .authenticate(secret.expose())
            .await
            .expect("auth")
            .is_none());
    }

    #[tokio::test]
    async fn session_rows_written_past_the_service_do_not_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = SqliteQueue::open(
            &dir.path().join("s.db"),
            &SqliteOptions::default(),
            test_cipher(),
        )
        .await
        .expect("open");
        let (reader, _) = q.create_key("reader", &[Scope::Read]).await.expect("key");
        let (admin, _) = q.create_key("root", &[Scope::Admin]).await.expect("key");
        let far = i64::MAX / 2;
        let secret = q
            .open_session(&reader.id, far)
            .await
            .expect("open")
            .expect("live key");
        assert!(secret.expose().starts_with("sps_") && secret.expose().len() == 4 + 64);
        assert_eq!(format!("{secret:?}"), "SessionSecret(<redacted>)");
        let stored: String = sqlx::query_scalar("SELECT hash FROM sessions")
            .fetch_one(&q.pool)
            .await
            .expect("row");
        assert!(!stored.contains(&secret.expose()[4..]), "stored hashed");
        // Moved to the admin key, or given a longer life: refused.
        for tamper in [
            format!("UPDATE sessions SET key_id = '{}'", admin.id),
            "UPDATE sessions SET expires_at = expires_at + 1".to_string(),
        ] {
            let before: (String, i64) = sqlx::query_as("SELECT key_id, expires_at FROM sessions")
                .fetch_one(&q.pool)
                .await
                .expect("row");
            sqlx::query(&tamper).execute(&q.pool).await.expect("tamper");
            assert!(q.session(secret.expose()).await.expect("look").is_none());
            sqlx::query("UPDATE sessions SET key_id = ?1, expires_at = ?2")
                .bind(&before.0)
                .bind(before.1)
                .execute(&q.pool)
                .await
                .expect("restore");
            let session = q.session(secret.expose()).await.expect("look");
            assert_eq!(session.map(|s| s.key.id), Some(reader.id.clone()));
        }
        // Minted for a secret of the writer's choosing: refused.
        let minted = format!("{SESSION_PREFIX}{}", "cd".repeat(32));
        sqlx::query(
            "INSERT INTO sessions (hash, key_id, created_at, expires_at, row_tag)
             VALUES (?1, ?2, 0, ?3, 'forged')",
        )
        .bind(hash_secret(&minted))
        .bind(&admin.id)
        .bind(far)
        .execute(&q.pool)
        .await
        .expect("mint");
        assert!(q.session(&minted).await.expect("look").is_none());
    }

    #[tokio::test]
    async fn keys_from_before_rows_were_tagged_are_tagged_once_on_opening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.db");
        let q = SqliteQueue::open(&path, &SqliteOptions::default(), test_cipher())
            .await
            .expect("open");
        let (_, secret) = q.create_key("old", &[Scope::Read]).await.expect("create");
        sqlx::query("UPDATE api_keys SET row_tag = NULL")
            .execute(&q.pool)
            .await
            .expect("as before tags");
        assert!(q
            .authenticate(secret.expose())
            .await
            .expect("auth")
            .is_none());
        drop(q);
        let q = SqliteQueue::open(&path, &SqliteOptions::default(), test_cipher())
            .await
            .expect("reopen");
        assert!(q
            .authenticate(secret.expose())
            .await
            .expect("auth")
            .is_some());
        // Once any row is tagged, an untagged one is never tagged by opening.
        let minted = format!("{SECRET_PREFIX}{}", "cd".repeat(32));
        sqlx::query(
            "INSERT INTO api_keys (id, name, hash, scopes, created_at)
             VALUES ('key_minted', 'root', ?1, 'admin', 0)",
        )
        .bind(hash_secret(&minted))
        .execute(&q.pool)
        .await
        .expect("mint");
        drop(q);
        let q = SqliteQueue::open(&path, &SqliteOptions::default(), test_cipher())
            .await
            .expect("reopen");
        assert!(q.authenticate(&minted).await.expect("auth").is_none());
    }

    #[tokio::test]
    async fn a_rotated_webhook_secret_signs_beside_the_new_one_for_its_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = crate::ManualClock::new(1_000);
        let q = SqliteQueue::open_with_clock(
            &dir.path().join("k.db"),
            &SqliteOptions::default(),
            std::sync::Arc::new(clock.clone()),
            test_cipher(),
        )
        .await
        .expect("open");
        let (key, _) = q
            .create_key("ci", &[Scope::Generate])
            .await
            .expect("create");
        assert!(q
            .webhook_secrets(&key.id)
            .await
            .expect("secrets")
            .is_empty());
        let grace = std::time::Duration::from_secs(60);
        assert!(q
            .set_webhook_secret(&key.id, b"first", grace)
            .await
            .expect("set"));
        let only: Vec<Vec<u8>> = q
            .webhook_secrets(&key.id)
            .await
            .expect("secrets")
            .iter()
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(only, vec![b"first".to_vec()]);
        assert!(q
            .set_webhook_secret(&key.id, b"second", grace)
            .await
            .expect("rotate"));
        let both: Vec<Vec<u8>> = q
            .webhook_secrets(&key.id)
            .await
            .expect("secrets")
            .iter()
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(both, vec![b"second".to_vec(), b"first".to_vec()]);
        clock.advance_ms(60_000);
        assert_eq!(q.webhook_secrets(&key.id).await.expect("secrets").len(), 1);
        assert!(!q
            .set_webhook_secret("key_nobody", b"x", grace)
            .await
            .expect("set"));
        q.revoke_key(&key.id).await.expect("revoke");
        assert!(!q
            .set_webhook_secret(&key.id, b"third", grace)
            .await
            .expect("set"));
    }
}
