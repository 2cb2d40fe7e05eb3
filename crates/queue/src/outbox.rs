//! The Discord outbox: which jobs owe a Discord interaction an answer, and how far that
//! answer has got. Delivery works it independently of the job: a Discord failure is retried
//! here and never touches, re-renders or loses the job's image. The interaction token and the
//! progress text (which quotes the prompt) are sealed in the database.

use crate::fields::{Field, FieldCipher};
use crate::sqlite::open_text;
use crate::{QueueError, SqliteQueue};
use async_trait::async_trait;
use sparkle_core::JobId;
use sqlx::Row;
use std::fmt;

/// Interaction tokens live 15 minutes.
pub const TOKEN_LIFETIME_MS: i64 = 15 * 60 * 1000;

/// Where a job's answer goes.
#[derive(Clone, PartialEq, Eq)]
pub struct DiscordTarget {
    pub job: JobId,
    pub application_id: String,
    /// The interaction token: a secret, never printed.
    pub token: String,
    pub channel_id: Option<String>,
    /// The largest attachment, in bytes, Discord said the response may carry; `None` when it
    /// did not say.
    pub attachment_size_limit: Option<u64>,
}

impl fmt::Debug for DiscordTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscordTarget")
            .field("job", &self.job)
            .field("application_id", &self.application_id)
            .field("token", &"<redacted>")
            .field("channel_id", &self.channel_id)
            .field("attachment_size_limit", &self.attachment_size_limit)
            .finish()
    }
}

/// A delivery that is due.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub target: DiscordTarget,
    pub created_at_ms: i64,
    pub token_expires_at_ms: i64,
    /// The progress text last shown, to send only changes.
    pub last_progress: Option<String>,
    pub last_edit_at_ms: Option<i64>,
    pub attempts: u32,
}

#[async_trait]
pub trait DiscordOutbox: Send + Sync + 'static {
    /// Records that `target.job` answers an interaction whose token lives `token_lifetime_ms`
    /// from now (once; repeats change nothing).
    async fn record(
        &self,
        target: &DiscordTarget,
        token_lifetime_ms: i64,
    ) -> Result<(), QueueError>;
    /// Pending deliveries whose next attempt is due, oldest first.
    async fn due(&self, limit: u32) -> Result<Vec<Delivery>, QueueError>;
    /// A progress edit went out.
    async fn progressed(&self, job: JobId, text: &str) -> Result<(), QueueError>;
    /// Try again no sooner than `after_ms` from now (rate limits, server errors).
    async fn retry_later(&self, job: JobId, after_ms: i64, error: &str) -> Result<(), QueueError>;
    /// Not due again until something changes: polled again after `after_ms`.
    async fn wait(&self, job: JobId, after_ms: i64) -> Result<(), QueueError>;
    /// The final answer went out.
    async fn delivered(&self, job: JobId) -> Result<(), QueueError>;
    /// Gave up (the reason is kept).
    async fn abandoned(&self, job: JobId, reason: &str) -> Result<(), QueueError>;
}

const DELIVERY_COLUMNS: &str = "job_id, application_id, token, channel_id, \
    attachment_size_limit, created_at, token_expires_at, last_progress, last_edit_at, attempts";

fn delivery_from_row(
    row: &sqlx::sqlite::SqliteRow,
    fields: &dyn FieldCipher,
) -> Result<Delivery, QueueError> {
    let id: String = row.try_get("job_id")?;
    let token: String = row.try_get("token")?;
    let last_progress: Option<String> = row.try_get("last_progress")?;
    let attachment_size_limit = row
        .try_get::<Option<i64>, _>("attachment_size_limit")?
        .map(u64::try_from)
        .transpose()
        .map_err(|_| QueueError::Corrupt {
            id: id.clone(),
            reason: "negative attachment_size_limit".into(),
        })?;
    Ok(Delivery {
        target: DiscordTarget {
            job: id.parse().map_err(|e| QueueError::Corrupt {
                id: id.clone(),
                reason: format!("{e}"),
            })?,
            application_id: row.try_get("application_id")?,
            token: open_text(fields, Field::DeliveryToken, &id, &token)?,
            channel_id: row.try_get("channel_id")?,
            attachment_size_limit,
        },
        created_at_ms: row.try_get("created_at")?,
        token_expires_at_ms: row.try_get("token_expires_at")?,
        last_progress: last_progress
            .map(|text| open_text(fields, Field::DeliveryProgress, &id, &text))
            .transpose()?,
        last_edit_at_ms: row.try_get("last_edit_at")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
    })
}

impl SqliteQueue {
    async fn set_state(
        &self,
        job: JobId,
        sql: &str,
        text: Option<&str>,
        after_ms: i64,
    ) -> Result<(), QueueError> {
        sqlx::query(sql)
            .bind(job.to_string())
            .bind(self.clock.now_ms())
            .bind(text)
            .bind(after_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl DiscordOutbox for SqliteQueue {
    async fn record(
        &self,
        target: &DiscordTarget,
        token_lifetime_ms: i64,
    ) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        let row = target.job.to_string();
        let token = self
            .fields
            .seal(Field::DeliveryToken, &row, target.token.as_bytes())?;
        sqlx::query(
            "INSERT INTO discord_deliveries (job_id, application_id, token, channel_id, created_at,
                token_expires_at, state, next_attempt_at, attachment_size_limit)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?5, ?7)
             ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(&row)
        .bind(&target.application_id)
        .bind(&token)
        .bind(&target.channel_id)
        .bind(now)
        .bind(now + token_lifetime_ms)
        // SQLite integers are signed; no upload limit comes near the difference.
        .bind(
            target
                .attachment_size_limit
                .map(|limit| i64::try_from(limit).unwrap_or(i64::MAX)),
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn due(&self, limit: u32) -> Result<Vec<Delivery>, QueueError> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM discord_deliveries
             WHERE state = 'pending' AND next_attempt_at <= ?1
             ORDER BY next_attempt_at, created_at LIMIT ?2"
        ))
        .bind(self.clock.now_ms())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| delivery_from_row(row, &*self.fields))
            .collect()
    }

    async fn progressed(&self, job: JobId, text: &str) -> Result<(), QueueError> {
        let sealed =
            self.fields
                .seal(Field::DeliveryProgress, &job.to_string(), text.as_bytes())?;
        self.set_state(
            job,
            "UPDATE discord_deliveries SET last_progress = ?3, last_edit_at = ?2, attempts = 0,
                error = NULL, next_attempt_at = ?2 + ?4 WHERE job_id = ?1",
            Some(&sealed),
            0,
        )
        .await
    }

    async fn retry_later(&self, job: JobId, after_ms: i64, error: &str) -> Result<(), QueueError> {
        self.set_state(
            job,
            "UPDATE discord_deliveries SET attempts = attempts + 1, error = ?3,
                next_attempt_at = ?2 + ?4 WHERE job_id = ?1",
            Some(error),
            after_ms,
        )
        .await
    }

    async fn wait(&self, job: JobId, after_ms: i64) -> Result<(), QueueError> {
        self.set_state(
            job,
            "UPDATE discord_deliveries SET next_attempt_at = ?2 + ?4, last_progress = COALESCE(?3, last_progress)
             WHERE job_id = ?1",
            None,
            after_ms,
        )
        .await
    }

    async fn delivered(&self, job: JobId) -> Result<(), QueueError> {
        self.set_state(
            job,
            "UPDATE discord_deliveries SET state = 'delivered', last_edit_at = ?2,
                last_progress = COALESCE(?3, last_progress), next_attempt_at = ?2 + ?4 WHERE job_id = ?1",
            None,
            0,
        )
        .await
    }

    async fn abandoned(&self, job: JobId, reason: &str) -> Result<(), QueueError> {
        self.set_state(
            job,
            "UPDATE discord_deliveries SET state = 'abandoned', error = ?3, next_attempt_at = ?2 + ?4
             WHERE job_id = ?1",
            Some(reason),
            0,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::testing::test_cipher;
    use crate::{ManualClock, SqliteOptions};
    use std::sync::Arc;

    #[tokio::test]
    async fn deliveries_are_recorded_once_and_come_due_on_schedule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(1_000_000);
        let q = SqliteQueue::open_with_clock(
            &dir.path().join("o.db"),
            &SqliteOptions::default(),
            Arc::new(clock.clone()),
            test_cipher(),
        )
        .await
        .expect("open");
        let target = DiscordTarget {
            job: JobId::random(),
            application_id: "9".into(),
            token: "secret".into(),
            channel_id: Some("6".into()),
            attachment_size_limit: Some(8 * 1024 * 1024),
        };
        assert!(!format!("{target:?}").contains("secret"));
        q.record(&target, TOKEN_LIFETIME_MS).await.expect("record");
        q.record(&target, TOKEN_LIFETIME_MS)
            .await
            .expect("record again");
        let due = q.due(10).await.expect("due");
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].target, target);
        assert_eq!(due[0].token_expires_at_ms, 1_000_000 + TOKEN_LIFETIME_MS);

        q.progressed(target.job, "step 1/4")
            .await
            .expect("progressed");
        assert_eq!(
            q.due(10).await.expect("due")[0].last_progress.as_deref(),
            Some("step 1/4")
        );
        q.retry_later(target.job, 2_000, "429")
            .await
            .expect("retry");
        assert!(q.due(10).await.expect("due").is_empty());
        clock.advance_ms(2_000);
        let due = q.due(10).await.expect("due");
        assert_eq!((due.len(), due[0].attempts), (1, 1));
        q.delivered(target.job).await.expect("delivered");
        clock.advance_ms(60_000);
        assert!(
            q.due(10).await.expect("due").is_empty(),
            "delivered is final"
        );
    }

    #[tokio::test]
    async fn the_attachment_limit_is_kept_and_may_be_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = SqliteQueue::open(
            &dir.path().join("o.db"),
            &SqliteOptions::default(),
            test_cipher(),
        )
        .await
        .expect("open");
        let limits = [None, Some(0), Some(1_500), Some(u64::MAX)];
        for limit in limits {
            let target = DiscordTarget {
                job: JobId::random(),
                application_id: "9".into(),
                token: "t".into(),
                channel_id: None,
                attachment_size_limit: limit,
            };
            q.record(&target, TOKEN_LIFETIME_MS).await.expect("record");
        }
        let mut kept: Vec<_> = q
            .due(10)
            .await
            .expect("due")
            .into_iter()
            .map(|d| d.target.attachment_size_limit)
            .collect();
        kept.sort();
        // u64::MAX is stored as SQLite's largest integer: still far beyond any real limit.
        assert_eq!(
            kept,
            [None, Some(0), Some(1_500), Some(i64::MAX as u64)],
            "{kept:?}"
        );
    }

    /// A delivery recorded before the limit was kept survives the upgrade, with no limit.
    #[tokio::test]
    async fn deliveries_from_before_the_limit_migrate_with_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("old-migrations");
        std::fs::create_dir(&old).expect("mkdir");
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        for name in ["0001_jobs.sql", "0002_discord_outbox.sql"] {
            std::fs::copy(here.join(name), old.join(name)).expect("copy migration");
        }
        let path = dir.path().join("o.db");
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
            .expect("migrate to 0002");
        let job = JobId::random();
        sqlx::query(
            "INSERT INTO discord_deliveries (job_id, application_id, token, channel_id,
                created_at, token_expires_at, state, next_attempt_at)
             VALUES (?1, '9', 't', '6', 0, 9999999999999, 'pending', 0)",
        )
        .bind(job.to_string())
        .execute(&pool)
        .await
        .expect("old row");
        pool.close().await;

        let q = SqliteQueue::open(&path, &SqliteOptions::default(), test_cipher())
            .await
            .expect("upgrade");
        let due = q.due(10).await.expect("due");
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].target.job, due[0].target.attachment_size_limit),
            (job, None)
        );
    }
}
