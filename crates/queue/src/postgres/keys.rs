//! [`ApiKeys`] on PostgreSQL; see [`crate::keys`] for how secrets are made and checked.

use super::PgQueue;
use crate::fields::Field;
use crate::keys::{
    grace_until, hash_matches, legacy_tags, live_session, new_key, presented_hash,
    presented_session_hash, signing_secrets, KeyRow, SessionRow, KEY_COLUMNS, MAX_SESSIONS_PER_KEY,
    SESSION_COLUMNS,
};
use crate::{ApiKey, ApiKeys, KeySecret, QueueError, Scope, Session, SessionSecret};
use async_trait::async_trait;
use tokio_postgres::Row;
use zeroize::Zeroizing;

fn key_row(row: &Row) -> Result<KeyRow, QueueError> {
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

impl PgQueue {
    /// Tags the key rows of a database from before rows were tagged (see
    /// [`crate::keys::legacy_tags`]).
    pub(crate) async fn tag_legacy_keys(&self) -> Result<(), QueueError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE", &[])
            .await?;
        let rows = tx
            .query(&format!("SELECT {KEY_COLUMNS} FROM api_keys"), &[])
            .await?
            .iter()
            .map(key_row)
            .collect::<Result<Vec<_>, _>>()?;
        for (id, tag) in legacy_tags(&*self.fields, rows) {
            tx.execute(
                "UPDATE api_keys SET row_tag = $2 WHERE id = $1",
                &[&id, &tag],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl ApiKeys for PgQueue {
    async fn create_key(
        &self,
        name: &str,
        scopes: &[Scope],
    ) -> Result<(ApiKey, KeySecret), QueueError> {
        let (key, secret, row) = new_key(name, scopes, self.now());
        let tag = row.expected_tag(&*self.fields, None);
        self.client()
            .await?
            .execute(
                "INSERT INTO api_keys (id, name, hash, scopes, created_at, row_tag)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &row.id,
                    &row.name,
                    &row.hash,
                    &row.scopes,
                    &row.created_at,
                    &tag,
                ],
            )
            .await?;
        Ok((key, secret))
    }

    async fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>, QueueError> {
        let Some(presented) = presented_hash(secret) else {
            return Ok(None);
        };
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1"),
                &[&presented],
            )
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
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"),
                &[],
            )
            .await?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            keys.extend(key_row(row)?.verified(&*self.fields));
        }
        Ok(keys)
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 AND revoked_at IS NULL"),
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let row = key_row(&row)?;
        let now = self.now();
        let tag = row.expected_tag(&*self.fields, Some(now));
        let done = client
            .execute(
                "UPDATE api_keys SET revoked_at = $2, row_tag = $3
                 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &now, &tag],
            )
            .await?;
        Ok(done == 1)
    }

    async fn set_webhook_secret(
        &self,
        id: &str,
        secret: &[u8],
        grace: std::time::Duration,
    ) -> Result<bool, QueueError> {
        let sealed = self.fields.seal(Field::WebhookSecret, id, secret)?;
        let until = grace_until(self.now(), grace);
        let done = self
            .client()
            .await?
            .execute(
                "UPDATE api_keys SET webhook_secret_previous = webhook_secret,
                    webhook_previous_until = CASE WHEN webhook_secret IS NULL THEN NULL
                        ELSE $3::BIGINT END,
                    webhook_secret = $2
                 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &sealed, &until],
            )
            .await?;
        Ok(done == 1)
    }

    async fn webhook_secrets(&self, id: &str) -> Result<Vec<Zeroizing<Vec<u8>>>, QueueError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT webhook_secret, webhook_secret_previous, webhook_previous_until
                 FROM api_keys WHERE id = $1",
                &[&id],
            )
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
            self.now(),
        )
    }

    async fn open_session(
        &self,
        key_id: &str,
        expires_at_ms: i64,
    ) -> Result<Option<SessionSecret>, QueueError> {
        let now = self.now();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The key's row, locked: sessions of one key are counted one sign-in at a time.
        let key = tx
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 FOR UPDATE"),
                &[&key_id],
            )
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
        tx.execute("DELETE FROM sessions WHERE expires_at <= $1", &[&now])
            .await?;
        tx.execute(
            &format!("INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"),
            &[
                &row.hash,
                &row.key_id,
                &row.created_at,
                &row.expires_at,
                &row.tag(&*self.fields),
            ],
        )
        .await?;
        tx.execute(
            "DELETE FROM sessions WHERE key_id = $1 AND hash <> $2 AND hash NOT IN (
                 SELECT hash FROM sessions WHERE key_id = $1 AND hash <> $2
                 ORDER BY created_at DESC, hash DESC LIMIT $3)",
            &[&key_id, &row.hash, &(MAX_SESSIONS_PER_KEY - 1)],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(secret))
    }

    async fn session(&self, secret: &str) -> Result<Option<Session>, QueueError> {
        let Some(presented) = presented_session_hash(secret) else {
            return Ok(None);
        };
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE hash = $1"),
                &[&presented],
            )
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
        let key = client
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"),
                &[&session.0.key_id],
            )
            .await?
            .map(|row| key_row(&row))
            .transpose()?;
        Ok(live_session(
            &*self.fields,
            &presented,
            session,
            key,
            self.now(),
        ))
    }

    async fn end_session(&self, secret: &str) -> Result<bool, QueueError> {
        let Some(presented) = presented_session_hash(secret) else {
            return Ok(false);
        };
        let done = self
            .client()
            .await?
            .execute("DELETE FROM sessions WHERE hash = $1", &[&presented])
            .await?;
        Ok(done == 1)
    }
}
