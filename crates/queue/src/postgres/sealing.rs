//! Keeping sealed fields sealed over time on PostgreSQL: a key rotation re-seals every value
//! under the new key (each row rewritten only if it did not change meanwhile); retiring a key
//! first asks which keys the values are under.

use super::PgQueue;
use crate::fields::{Field, FieldKeyUsage};
use crate::sealing::reseal;
use crate::QueueError;

/// The sealed columns: (table, key column, column, field).
const SEALED: &[(&str, &str, &str, Field)] = &[
    ("jobs", "id", "request", Field::JobRequest),
    ("jobs", "id", "group_sealed", Field::JobGroup),
    ("jobs", "id", "error_detail", Field::JobErrorDetail),
    ("deliveries", "id", "payload", Field::ReplyPayload),
    ("deliveries", "id", "state", Field::ReplyState),
    ("api_keys", "id", "webhook_secret", Field::WebhookSecret),
    (
        "api_keys",
        "id",
        "webhook_secret_previous",
        Field::WebhookSecret,
    ),
];

impl PgQueue {
    /// Re-seals every sealed value that is not under the active key; how many values were
    /// rewritten.
    pub async fn reseal_fields(&self) -> Result<u64, QueueError> {
        let fields = &*self.fields;
        let active = fields.active_key();
        let client = self.client().await?;
        let mut rewritten = 0;
        for (table, key, column, field) in SEALED {
            let rows = client
                .query(
                    &format!("SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL"),
                    &[],
                )
                .await?;
            for row in &rows {
                let id: String = row.try_get(0)?;
                let sealed: String = row.try_get(1)?;
                let Some(fresh) = reseal(fields, *field, &id, &sealed, &active)? else {
                    continue;
                };
                rewritten += client
                    .execute(
                        &format!(
                            "UPDATE {table} SET {column} = $2 WHERE {key} = $1 AND {column} = $3"
                        ),
                        &[&id, &fresh, &sealed],
                    )
                    .await?;
            }
        }
        Ok(rewritten)
    }

    /// How many sealed values each key holds: a key is retired only when it holds none.
    pub async fn field_key_usage(&self) -> Result<FieldKeyUsage, QueueError> {
        let client = self.client().await?;
        let mut usage = FieldKeyUsage::default();
        for (table, _, column, _) in SEALED {
            let rows = client
                .query(
                    &format!("SELECT {column} FROM {table} WHERE {column} IS NOT NULL"),
                    &[],
                )
                .await?;
            for row in &rows {
                let value: String = row.try_get(0)?;
                match self.fields.key_of(&value) {
                    Some(key) => *usage.by_key.entry(key).or_default() += 1,
                    None => usage.unsealed += 1,
                }
            }
        }
        Ok(usage)
    }
}
