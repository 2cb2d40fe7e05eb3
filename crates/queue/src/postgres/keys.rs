//! [`ApiKeys`] on PostgreSQL; see [`crate::keys`] for how secrets are made and checked.

use super::PgQueue;
use crate::fields::Field;
use crate::keys::{
    grace_until, hash_matches, key_from_columns, new_key, presented_hash, signing_secrets,
};
use crate::{ApiKey, ApiKeys, KeySecret, QueueError, Scope};
use async_trait::async_trait;
use tokio_postgres::Row;
use zeroize::Zeroizing;

fn key_from_row(row: &Row) -> Result<ApiKey, QueueError> {
    Ok(key_from_columns(
        row.try_get("id")?,
        row.try_get("name")?,
        row.try_get("scopes")?,
        row.try_get("created_at")?,
        row.try_get("revoked_at")?,
    ))
}

#[async_trait]
impl ApiKeys for PgQueue {
    async fn create_key(
        &self,
        name: &str,
        scopes: &[Scope],
    ) -> Result<(ApiKey, KeySecret), QueueError> {
        let (key, secret, hash, scopes) = new_key(name, scopes, self.now());
        self.client()
            .await?
            .execute(
                "INSERT INTO api_keys (id, name, hash, scopes, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&key.id, &key.name, &hash, &scopes, &key.created_at_ms],
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
                "SELECT id, name, scopes, created_at, revoked_at, hash FROM api_keys
                 WHERE hash = $1",
                &[&presented],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if !hash_matches(row.try_get("hash")?, &presented) {
            return Ok(None);
        }
        Ok(Some(key_from_row(&row)?).filter(|k| !k.revoked))
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, QueueError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, name, scopes, created_at, revoked_at FROM api_keys
                 ORDER BY created_at, id",
                &[],
            )
            .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, QueueError> {
        let done = self
            .client()
            .await?
            .execute(
                "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &self.now()],
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
}
