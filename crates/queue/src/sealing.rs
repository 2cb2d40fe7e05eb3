//! Keeping sealed fields sealed over time: rows written before fields were sealed are sealed
//! the first time the file is opened with migrations; a key rotation re-seals every value
//! under the new key; retiring a key first asks which keys the values are under.

use crate::fields::{Field, FieldCipher, FieldKeyUsage};
use crate::{QueueError, SqliteQueue};
use sqlx::Row;
use std::collections::BTreeSet;

/// Re-seals `sealed` (of `field` in `row`) under the active key, `None` if it already is.
pub(crate) fn reseal(
    fields: &dyn FieldCipher,
    field: Field,
    row: &str,
    sealed: &str,
    active: &str,
) -> Result<Option<String>, QueueError> {
    if fields.key_of(sealed).as_deref() == Some(active) {
        return Ok(None);
    }
    let plain = fields
        .open(field, row, sealed)
        .map_err(|e| QueueError::Corrupt {
            id: row.to_string(),
            reason: format!("{}: {e}", field.name()),
        })?;
    Ok(Some(fields.seal(field, row, &plain)?))
}

impl SqliteQueue {
    /// Seals the rows written before fields were sealed (once: migration 0004 leaves a
    /// marker that this clears), then empties the write-ahead log so that no copy of the
    /// plain values stays behind there (`secure_delete` clears them from the file itself).
    pub(crate) async fn seal_plain_rows(&self) -> Result<(), QueueError> {
        let fields = &*self.fields;
        let (_turn, mut tx) = crate::sqlite::begin_write(&self.pool, &self.write_turn).await?;
        let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM plain_rows_pending")
            .fetch_one(&mut *tx)
            .await?;
        if pending == 0 {
            return Ok(());
        }
        let jobs = sqlx::query(
            "SELECT id, group_key, dedup_key, request_hash, request FROM jobs
             WHERE group_sealed IS NULL",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut sealed = 0u64;
        for job in &jobs {
            let id: String = job.try_get("id")?;
            let group: String = job.try_get("group_key")?;
            let dedup: Option<String> = job.try_get("dedup_key")?;
            let hash: String = job.try_get("request_hash")?;
            let request: String = job.try_get("request")?;
            sqlx::query(
                "UPDATE jobs SET group_key = ?2, group_sealed = ?3, dedup_key = ?4,
                    request_hash = ?5, request = ?6 WHERE id = ?1",
            )
            .bind(&id)
            .bind(fields.blind(Field::JobGroup, group.as_bytes()))
            .bind(fields.seal(Field::JobGroup, &id, group.as_bytes())?)
            .bind(dedup.map(|d| fields.blind(Field::JobDedup, d.as_bytes())))
            .bind(fields.blind(Field::JobFingerprint, hash.as_bytes()))
            .bind(fields.seal(Field::JobRequest, &id, request.as_bytes())?)
            .execute(&mut *tx)
            .await?;
            sealed += 1;
        }
        // Groups keep their turn under their new name; names no job uses go.
        let groups = sqlx::query("SELECT name, last_served FROM groups")
            .fetch_all(&mut *tx)
            .await?;
        let in_use: BTreeSet<String> = sqlx::query_scalar("SELECT DISTINCT group_key FROM jobs")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        for group in &groups {
            let name: String = group.try_get("name")?;
            if in_use.contains(&name) {
                continue;
            }
            let blind = fields.blind(Field::JobGroup, name.as_bytes());
            sqlx::query("DELETE FROM groups WHERE name = ?1")
                .bind(&name)
                .execute(&mut *tx)
                .await?;
            if in_use.contains(&blind) {
                sqlx::query(
                    "INSERT INTO groups (name, last_served) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE
                     SET last_served = MAX(last_served, excluded.last_served)",
                )
                .bind(&blind)
                .bind(group.try_get::<i64, _>("last_served")?)
                .execute(&mut *tx)
                .await?;
            }
        }
        if sealed > 0 {
            // Before shares, a job's group was its share: both take the groups' new names.
            sqlx::query("UPDATE jobs SET share_key = group_key")
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM shares").execute(&mut *tx).await?;
            sqlx::query(
                "INSERT INTO shares (name, last_served, queued) SELECT name, last_served, 0 FROM groups",
            )
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE groups SET share = name")
                .execute(&mut *tx)
                .await?;
            crate::fairness::recount(&mut tx).await?;
        }
        sqlx::query("DELETE FROM plain_rows_pending")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if sealed > 0 {
            tracing::info!(
                jobs = sealed,
                "sealed rows written before fields were sealed"
            );
        }
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Re-seals every sealed value that is not under the active key (after a key
    /// rotation). Each row is rewritten only if it did not change meanwhile. Returns how
    /// many rows were rewritten.
    pub async fn reseal_fields(&self) -> Result<u64, QueueError> {
        let fields = &*self.fields;
        let active = fields.active_key();
        let mut rewritten = 0;
        let jobs = sqlx::query("SELECT id, request, group_sealed FROM jobs")
            .fetch_all(&self.pool)
            .await?;
        for job in &jobs {
            let id: String = job.try_get("id")?;
            let request: String = job.try_get("request")?;
            let Some(group): Option<String> = job.try_get("group_sealed")? else {
                continue;
            };
            let new_request = reseal(fields, Field::JobRequest, &id, &request, &active)?;
            let new_group = reseal(fields, Field::JobGroup, &id, &group, &active)?;
            if new_request.is_none() && new_group.is_none() {
                continue;
            }
            let done = sqlx::query(
                "UPDATE jobs SET request = ?2, group_sealed = ?3
                 WHERE id = ?1 AND request = ?4 AND group_sealed = ?5",
            )
            .bind(&id)
            .bind(new_request.as_ref().unwrap_or(&request))
            .bind(new_group.as_ref().unwrap_or(&group))
            .bind(&request)
            .bind(&group)
            .execute(&self.pool)
            .await?;
            rewritten += done.rows_affected();
        }
        let deliveries = sqlx::query("SELECT id, payload, state FROM deliveries")
            .fetch_all(&self.pool)
            .await?;
        for delivery in &deliveries {
            let id: String = delivery.try_get("id")?;
            let payload: String = delivery.try_get("payload")?;
            let state: Option<String> = delivery.try_get("state")?;
            let new_payload = reseal(fields, Field::ReplyPayload, &id, &payload, &active)?;
            let new_state = match &state {
                Some(text) => reseal(fields, Field::ReplyState, &id, text, &active)?,
                None => None,
            };
            if new_payload.is_none() && new_state.is_none() {
                continue;
            }
            let done = sqlx::query(
                "UPDATE deliveries SET payload = ?2, state = ?3
                 WHERE id = ?1 AND payload = ?4 AND state IS ?5",
            )
            .bind(&id)
            .bind(new_payload.as_ref().unwrap_or(&payload))
            .bind(new_state.as_ref().or(state.as_ref()))
            .bind(&payload)
            .bind(&state)
            .execute(&self.pool)
            .await?;
            rewritten += done.rows_affected();
        }
        let keys = sqlx::query(
            "SELECT id, webhook_secret, webhook_secret_previous FROM api_keys
             WHERE webhook_secret IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        for key in &keys {
            let id: String = key.try_get("id")?;
            let current: String = key.try_get("webhook_secret")?;
            let previous: Option<String> = key.try_get("webhook_secret_previous")?;
            let new_current = reseal(fields, Field::WebhookSecret, &id, &current, &active)?;
            let new_previous = match &previous {
                Some(text) => reseal(fields, Field::WebhookSecret, &id, text, &active)?,
                None => None,
            };
            if new_current.is_none() && new_previous.is_none() {
                continue;
            }
            let done = sqlx::query(
                "UPDATE api_keys SET webhook_secret = ?2, webhook_secret_previous = ?3
                 WHERE id = ?1 AND webhook_secret = ?4 AND webhook_secret_previous IS ?5",
            )
            .bind(&id)
            .bind(new_current.as_ref().unwrap_or(&current))
            .bind(new_previous.as_ref().or(previous.as_ref()))
            .bind(&current)
            .bind(&previous)
            .execute(&self.pool)
            .await?;
            rewritten += done.rows_affected();
        }
        Ok(rewritten)
    }

    /// How many sealed values each key holds: a key is retired only when it holds none.
    pub async fn field_key_usage(&self) -> Result<FieldKeyUsage, QueueError> {
        let mut usage = FieldKeyUsage::default();
        let values: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT request FROM jobs UNION ALL SELECT group_sealed FROM jobs
             UNION ALL SELECT payload FROM deliveries
             UNION ALL SELECT state FROM deliveries
             UNION ALL SELECT webhook_secret FROM api_keys
             UNION ALL SELECT webhook_secret_previous FROM api_keys",
        )
        .fetch_all(&self.pool)
        .await?;
        for value in values.iter().flatten() {
            match self.fields.key_of(value) {
                Some(key) => *usage.by_key.entry(key).or_default() += 1,
                None => usage.unsealed += 1,
            }
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::new_job;
    use crate::fields::testing::TestCipher;
    use crate::{JobQueue, Outbox, ReplyTarget, Settle, SqliteOptions};
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    const NEEDLES: [&str; 6] = [
        "zebra unicorn lantern",
        "murky fog",
        "31337",
        "idem-4242",
        "tok-sesame",
        "fp-unique",
    ];

    fn secret_job() -> crate::NewJob {
        let mut job = new_job("discord:31337", "zebra unicorn lantern");
        // The owner is an API key id, or `discord` for every Discord user: not a secret.
        job.owner = "discord".into();
        job.request.negative_prompt = "murky fog".into();
        job.dedup_key = Some("idem-4242".into());
        job.fingerprint = "fp-unique".into();
        job.replies = vec![ReplyTarget::new("discord", b"tok-sesame".to_vec())];
        job
    }

    /// Claims the one `discord` delivery, checks its payload, and records `state` with it.
    async fn claim_and_record(q: &SqliteQueue, state: &str) {
        let claimed = q
            .claim("discord", 10, Duration::from_secs(30))
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].payload.as_slice(), b"tok-sesame");
        q.settle(
            &claimed[0].claim,
            Settle::AwaitChange {
                not_before: Duration::ZERO,
                fallback: Duration::ZERO,
                state: Some(state.as_bytes().to_vec()),
            },
        )
        .await
        .expect("settle");
    }

    /// Every needle that appears in any file of `dir`.
    fn found_in(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            // SQLite's own temporary files (a journal) may go between listing and reading.
            let Ok(bytes) = std::fs::read(entry.path()) else {
                continue;
            };
            for needle in NEEDLES {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(format!("{needle} in {}", entry.path().display()));
                }
            }
        }
        found
    }

    #[tokio::test]
    async fn sensitive_values_never_reach_the_file_in_the_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = SqliteQueue::open(
            &dir.path().join("q.db"),
            &SqliteOptions::default(),
            Arc::new(TestCipher::default()),
        )
        .await
        .expect("open");
        let job = q.enqueue(secret_job()).await.expect("enqueue").job;
        assert_eq!(
            (job.group.as_str(), job.request.negative_prompt.as_str()),
            ("discord:31337", "murky fog")
        );
        let again = q.enqueue(secret_job()).await.expect("dedup");
        assert!(
            !again.created && again.job.id == job.id,
            "blind dedup keys match"
        );
        let mut other = secret_job();
        other.fingerprint = "fp-other".into();
        assert!(matches!(
            q.enqueue(other).await,
            Err(QueueError::IdempotencyConflict)
        ));
        assert_eq!(q.live_in_group("discord:31337").await.expect("live"), 1);
        claim_and_record(&q, "Painting **zebra unicorn lantern** — step 1/4").await;
        let claimed = q
            .claim("discord", 10, Duration::from_secs(30))
            .await
            .expect("claim");
        assert!(claimed[0]
            .state
            .as_deref()
            .is_some_and(|p| String::from_utf8_lossy(p).contains("zebra")));
        let leased = q
            .lease("w", 1, std::time::Duration::from_secs(30))
            .await
            .expect("lease");
        assert_eq!(leased[0].job.request.prompt, "zebra unicorn lantern");
        q.close().await;
        assert_eq!(found_in(dir.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn rows_from_before_sealing_are_sealed_when_the_file_is_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("old-migrations");
        std::fs::create_dir(&old).expect("mkdir");
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        for name in [
            "0001_jobs.sql",
            "0002_discord_outbox.sql",
            "0003_discord_attachment_limit.sql",
        ] {
            std::fs::copy(here.join(name), old.join(name)).expect("copy migration");
        }
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let path = data.join("q.db");
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .expect("connect");
        sqlx::migrate::Migrator::new(old.as_path())
            .await
            .expect("old migrations")
            .run(&pool)
            .await
            .expect("migrate to 0003");
        let job = sparkle_core::JobId::random();
        let plain = secret_job();
        sqlx::query(
            "INSERT INTO jobs (id, owner, group_key, dedup_key, request_hash, request, batch_key,
                status, max_attempts, created_at, updated_at)
             VALUES (?1, 'discord', ?2, ?3, ?4, ?5, ?6, 'queued', 3, 0, 0)",
        )
        .bind(job.to_string())
        .bind(&plain.group)
        .bind(&plain.dedup_key)
        .bind(&plain.fingerprint)
        .bind(crate::record::StoredRequest::encode(&plain.request).expect("json"))
        .bind(plain.request.batch_key())
        .execute(&pool)
        .await
        .expect("old job");
        sqlx::query("INSERT INTO groups (name, last_served) VALUES (?1, 7)")
            .bind(&plain.group)
            .execute(&pool)
            .await
            .expect("old group");
        // The Discord-only outbox of that time is not carried over: its plain token must
        // not survive the upgrade anywhere in the files.
        sqlx::query(
            "INSERT INTO discord_deliveries (job_id, application_id, token, created_at,
                token_expires_at, state, next_attempt_at, last_progress)
             VALUES (?1, '9', 'tok-sesame', 0, 9999999999999, 'pending', 0, 'Queued zebra unicorn lantern')",
        )
        .bind(job.to_string())
        .execute(&pool)
        .await
        .expect("old delivery");
        pool.close().await;

        let q = SqliteQueue::open(
            &path,
            &SqliteOptions::default(),
            Arc::new(TestCipher::default()),
        )
        .await
        .expect("upgrade");
        let found = q.get(job).await.expect("get").expect("kept");
        assert_eq!(
            (found.group.as_str(), found.request.prompt.as_str()),
            ("discord:31337", "zebra unicorn lantern")
        );
        assert_eq!(q.live_in_group("discord:31337").await.expect("live"), 1);
        let served: i64 = sqlx::query_scalar("SELECT MAX(last_served) FROM groups")
            .fetch_one(&q.pool)
            .await
            .expect("groups");
        assert_eq!(served, 7, "the group keeps its turn");
        let again = q.enqueue(secret_job()).await.expect("dedup");
        assert!(
            !again.created && again.job.id == job,
            "old dedup keys still match"
        );
        q.close().await;
        assert_eq!(found_in(&data), Vec::<String>::new());
        let q = SqliteQueue::open(
            &path,
            &SqliteOptions::default(),
            Arc::new(TestCipher::default()),
        )
        .await
        .expect("reopen");
        assert_eq!(q.get(job).await.expect("get").expect("kept").id, job);
    }

    #[tokio::test]
    async fn a_rotation_reseals_every_value_under_the_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cipher = Arc::new(TestCipher::default());
        let q = SqliteQueue::open(
            &dir.path().join("q.db"),
            &SqliteOptions::default(),
            cipher.clone(),
        )
        .await
        .expect("open");
        let job = q.enqueue(secret_job()).await.expect("enqueue").job;
        q.enqueue(new_job("alice", "plain")).await.expect("enqueue");
        claim_and_record(&q, "step 1/4").await;
        let usage = q.field_key_usage().await.expect("usage");
        assert_eq!(usage.by_key.get("k1"), Some(&6));
        cipher.switch_to("k2");
        assert_eq!(q.reseal_fields().await.expect("reseal"), 3);
        let usage = q.field_key_usage().await.expect("usage");
        assert_eq!(
            (usage.by_key.into_iter().collect::<Vec<_>>(), usage.unsealed),
            (vec![("k2".to_string(), 6)], 0)
        );
        assert_eq!(q.reseal_fields().await.expect("again"), 0);
        assert_eq!(
            q.get(job.id).await.expect("get").expect("job").group,
            "discord:31337"
        );
        let claimed = q
            .claim("discord", 10, Duration::from_secs(30))
            .await
            .expect("claim");
        assert_eq!(claimed[0].payload.as_slice(), b"tok-sesame");
        assert_eq!(
            claimed[0].state.as_deref().map(|s| s.as_slice()),
            Some(&b"step 1/4"[..])
        );
    }
}
