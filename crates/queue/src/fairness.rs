//! Whose turn it is, in SQLite: shares round-robin, groups round-robin inside their share,
//! FIFO inside a group, read from counters and partial indexes so that choosing the next
//! job costs the same with ten queued jobs or a hundred thousand.
//!
//! Every turn taken stamps the share and the group with the next value of one counter; the
//! waiting share (or group) with the oldest stamp goes next. One that starts waiting is
//! stamped at once with the next value, behind everyone already waiting: so no share ever
//! waits behind more than one job of any other share, however many shares or groups a
//! client makes up.

use crate::QueueError;
use sqlx::{Row, SqliteConnection};

/// Makes sure `share` and `group` (blind indexes) have their turn rows before a job of
/// theirs is inserted; a share or group with nothing queued starts waiting behind everyone.
pub(crate) async fn join_queue(
    tx: &mut SqliteConnection,
    share: &str,
    group: &str,
) -> Result<(), QueueError> {
    let share_waits: Option<i64> = sqlx::query_scalar("SELECT queued FROM shares WHERE name = ?1")
        .bind(share)
        .fetch_optional(&mut *tx)
        .await?;
    if share_waits.unwrap_or(0) == 0 {
        let stamp = next_stamp(tx).await?;
        sqlx::query(
            "INSERT INTO shares (name, last_served, queued) VALUES (?1, ?2, 0)
             ON CONFLICT (name) DO UPDATE SET last_served = excluded.last_served",
        )
        .bind(share)
        .bind(stamp)
        .execute(&mut *tx)
        .await?;
    }
    let group_waits: Option<i64> = sqlx::query_scalar("SELECT queued FROM groups WHERE name = ?1")
        .bind(group)
        .fetch_optional(&mut *tx)
        .await?;
    if group_waits.unwrap_or(0) == 0 {
        let stamp = next_stamp(tx).await?;
        sqlx::query(
            "INSERT INTO groups (name, last_served, share, queued) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT (name) DO UPDATE SET last_served = excluded.last_served,
                share = excluded.share",
        )
        .bind(group)
        .bind(stamp)
        .bind(share)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

async fn next_stamp(tx: &mut SqliteConnection) -> Result<i64, QueueError> {
    Ok(
        sqlx::query_scalar("UPDATE queue_counts SET stamp = stamp + 1 RETURNING stamp")
            .fetch_one(&mut *tx)
            .await?,
    )
}

/// A queued job chosen to lease next.
pub(crate) struct Next {
    pub id: String,
    pub batch_key: String,
    share: String,
    group: String,
}

/// The job whose turn it is: the waiting share with the oldest stamp, its waiting group with
/// the oldest stamp, that group's oldest job.
pub(crate) async fn next_job(tx: &mut SqliteConnection) -> Result<Option<Next>, QueueError> {
    let Some(share) = sqlx::query_scalar::<_, String>(
        "SELECT name FROM shares WHERE queued > 0 ORDER BY last_served LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    let group: Option<String> = sqlx::query_scalar(
        "SELECT name FROM groups WHERE share = ?1 AND queued > 0 ORDER BY last_served LIMIT 1",
    )
    .bind(&share)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(group) = group else {
        return Err(counts_disagree(&share));
    };
    let row = sqlx::query(
        "SELECT id, batch_key FROM jobs WHERE status = 'queued' AND group_key = ?1
         ORDER BY seq LIMIT 1",
    )
    .bind(&group)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(counts_disagree(&group));
    };
    Ok(Some(Next {
        id: row.try_get("id")?,
        batch_key: row.try_get("batch_key")?,
        share,
        group,
    }))
}

/// The job whose turn it is among the jobs of `models`: the waiting share with the oldest
/// stamp that has one, its group with the oldest stamp that has one, that group's oldest.
/// The job in turn overall is taken when it is of one of them (the common case costs what
/// [`next_job`] costs); else at most [`BATCH_SHARES`] shares are looked at.
pub(crate) async fn next_job_of(
    tx: &mut SqliteConnection,
    models: &[String],
) -> Result<Option<Next>, QueueError> {
    match next_job(&mut *tx).await? {
        None => return Ok(None),
        Some(next)
            if models
                .iter()
                .any(|m| m == sparkle_core::model_of_batch_key(&next.batch_key)) =>
        {
            return Ok(Some(next))
        }
        Some(_) => {}
    }
    let models = serde_json::to_string(models).map_err(|e| QueueError::Corrupt {
        id: "models".into(),
        reason: e.to_string(),
    })?;
    first_in_turn(
        tx,
        "SELECT jobs.id, jobs.batch_key, jobs.group_key FROM jobs
            JOIN groups ON groups.name = jobs.group_key
         WHERE jobs.status = 'queued' AND jobs.share_key = ?1
           AND jobs.model IN (SELECT value FROM json_each(?2))
         ORDER BY groups.last_served, jobs.seq LIMIT 1",
        &models,
    )
    .await
}

/// Shares looked at when filling a batch with jobs of one batch key.
pub(crate) const BATCH_SHARES: i64 = 256;

/// The next job with `batch_key` in turn order: the first waiting share (by stamp) that has
/// one, its oldest such job. Looks at most at the [`BATCH_SHARES`] next shares.
pub(crate) async fn next_compatible(
    tx: &mut SqliteConnection,
    batch_key: &str,
) -> Result<Option<Next>, QueueError> {
    first_in_turn(
        tx,
        "SELECT id, batch_key, group_key FROM jobs
         WHERE status = 'queued' AND share_key = ?1 AND batch_key = ?2
         ORDER BY seq LIMIT 1",
        batch_key,
    )
    .await
}

/// The first job `pick` (`?1` a share, `?2` the argument) finds in the next
/// [`BATCH_SHARES`] waiting shares, in turn order.
async fn first_in_turn(
    tx: &mut SqliteConnection,
    pick: &str,
    arg: &str,
) -> Result<Option<Next>, QueueError> {
    let shares: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM shares WHERE queued > 0 ORDER BY last_served LIMIT ?1",
    )
    .bind(BATCH_SHARES)
    .fetch_all(&mut *tx)
    .await?;
    for share in shares {
        let row = sqlx::query(pick)
            .bind(&share)
            .bind(arg)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = row {
            return Ok(Some(Next {
                id: row.try_get("id")?,
                batch_key: row.try_get("batch_key")?,
                group: row.try_get("group_key")?,
                share,
            }));
        }
    }
    Ok(None)
}

/// Records that `next`'s share and group had their turn.
pub(crate) async fn took_turn(tx: &mut SqliteConnection, next: &Next) -> Result<(), QueueError> {
    let stamp = next_stamp(tx).await?;
    sqlx::query("UPDATE shares SET last_served = ?2 WHERE name = ?1")
        .bind(&next.share)
        .bind(stamp)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE groups SET last_served = ?2 WHERE name = ?1")
        .bind(&next.group)
        .bind(stamp)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

fn counts_disagree(name: &str) -> QueueError {
    QueueError::Corrupt {
        id: name.to_string(),
        reason: "queued counts disagree with the queued jobs".into(),
    }
}

/// Recounts every share's, group's and the whole queue's jobs from the jobs themselves
/// (after rows were renamed in bulk).
pub(crate) async fn recount(tx: &mut SqliteConnection) -> Result<(), QueueError> {
    for sql in [
        "INSERT INTO shares (name, last_served, queued)
            SELECT DISTINCT share_key, 0, 0 FROM jobs WHERE share_key IS NOT NULL
         ON CONFLICT (name) DO NOTHING",
        "INSERT INTO groups (name, last_served, share, queued)
            SELECT group_key, 0, MIN(share_key), 0 FROM jobs GROUP BY group_key
         ON CONFLICT (name) DO NOTHING",
        "UPDATE groups SET share = COALESCE(
            (SELECT MIN(share_key) FROM jobs WHERE jobs.group_key = groups.name), share)",
        "UPDATE shares SET queued = (SELECT COUNT(*) FROM jobs
            WHERE jobs.share_key = shares.name AND jobs.status = 'queued')",
        "UPDATE groups SET queued = (SELECT COUNT(*) FROM jobs
            WHERE jobs.group_key = groups.name AND jobs.status = 'queued')",
        "UPDATE queue_counts SET
            queued = (SELECT COUNT(*) FROM jobs WHERE status = 'queued'),
            running = (SELECT COUNT(*) FROM jobs WHERE status = 'running')",
    ] {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    Ok(())
}
