//! Whose turn it is, in PostgreSQL, with any number of claimers at once: the same two-level
//! round-robin as the embedded backend (see [`crate::fairness`]), read from the same
//! counters. A claimer locks the waiting share with the oldest stamp with `SKIP LOCKED`, so a
//! second claimer at the same moment takes the share after it — the next turn — instead of
//! waiting; then the share's waiting group with the oldest stamp and that group's oldest job
//! the same way. Holding the share and the group is what keeps FIFO within a group and one
//! turn per share under concurrency; a claimer never waits on a row another holds.

use crate::fairness::BATCH_SHARES;
use crate::position::COUNTED_FROM_AN_END;
use crate::QueueError;
use tokio_postgres::Transaction;

/// A queued job chosen to lease next, locked by the claiming transaction with its share and
/// group.
pub(crate) struct Next {
    pub id: String,
    pub batch_key: String,
    pub share: String,
    pub group: String,
}

/// Shares passed over at most when their groups or jobs are all held by others.
const MAX_PASSED_OVER: usize = 8;

/// Times the turn order is read again when every candidate was taken by other claimers
/// meanwhile (their turns moved the order on): many claimers at once must not come back
/// empty-handed from a queue that has work.
const MAX_ROUNDS: usize = 8;

/// The job whose turn it is, or `None` when nothing is queued that no one else holds.
pub(crate) async fn next_job(tx: &Transaction<'_>) -> Result<Option<Next>, QueueError> {
    for _ in 0..MAX_ROUNDS {
        match next_in_round(tx).await? {
            Round::Took(next) => return Ok(Some(next)),
            Round::Empty => return Ok(None),
            Round::Contended => continue,
        }
    }
    Ok(None)
}

enum Round {
    Took(Next),
    /// No share has work.
    Empty,
    /// Every share read was taken or held by another claimer.
    Contended,
}

async fn next_in_round(tx: &Transaction<'_>) -> Result<Round, QueueError> {
    // The turn order as of now, read without locks; then each candidate locked only if its
    // stamp is still the one read (a share whose turn another claimer just took has a newer
    // stamp, and waits for its next turn).
    let candidates = tx
        .query(
            "SELECT name, last_served FROM shares WHERE queued > 0 ORDER BY last_served LIMIT $1",
            &[&(MAX_PASSED_OVER as i64 + 1)],
        )
        .await?;
    for candidate in &candidates {
        let share: String = candidate.try_get(0)?;
        let stamp: i64 = candidate.try_get(1)?;
        let row = tx
            .query_opt(
                "WITH s AS (
                    SELECT name FROM shares WHERE name = $1 AND last_served = $2 AND queued > 0
                    FOR UPDATE SKIP LOCKED),
                 g AS (
                    SELECT groups.name FROM groups, s
                    WHERE groups.share = s.name AND groups.queued > 0
                    ORDER BY groups.last_served LIMIT 1 FOR UPDATE OF groups SKIP LOCKED),
                 j AS (
                    SELECT jobs.id, jobs.batch_key FROM jobs, g
                    WHERE jobs.status = 'queued' AND jobs.group_key = g.name
                    ORDER BY jobs.seq LIMIT 1 FOR UPDATE OF jobs SKIP LOCKED)
                 SELECT g.name AS grp, j.id, j.batch_key FROM g, j",
                &[&share, &stamp],
            )
            .await?;
        if let Some(row) = row {
            return Ok(Round::Took(Next {
                id: row.try_get("id")?,
                batch_key: row.try_get("batch_key")?,
                group: row.try_get("grp")?,
                share,
            }));
        }
        // Held by another claimer, its turn just taken, or its groups held by a submit.
    }
    Ok(if candidates.is_empty() {
        Round::Empty
    } else {
        Round::Contended
    })
}

/// The next job with `batch_key` in turn order that no one else holds: the first waiting
/// share (by stamp) with one, its oldest such job. Looks at most at [`BATCH_SHARES`] shares.
pub(crate) async fn next_compatible(
    tx: &Transaction<'_>,
    batch_key: &str,
) -> Result<Option<Next>, QueueError> {
    first_in_turn(
        tx,
        "SELECT jobs.id, jobs.batch_key, jobs.group_key FROM jobs, s
         WHERE jobs.status = 'queued' AND jobs.share_key = s.name AND jobs.batch_key = $2
         ORDER BY jobs.seq LIMIT 1 FOR UPDATE OF jobs SKIP LOCKED",
        &batch_key,
    )
    .await
}

/// The job whose turn it is among the jobs of `models` that no one else holds: the first
/// waiting share (by stamp) with one, its group with the oldest stamp that has one, that
/// group's oldest. Looks at most at [`BATCH_SHARES`] shares.
pub(crate) async fn next_job_of(
    tx: &Transaction<'_>,
    models: &[String],
) -> Result<Option<Next>, QueueError> {
    first_in_turn(
        tx,
        "SELECT jobs.id, jobs.batch_key, jobs.group_key FROM jobs
            JOIN groups ON groups.name = jobs.group_key, s
         WHERE jobs.status = 'queued' AND jobs.share_key = s.name AND jobs.model = ANY($2)
         ORDER BY groups.last_served, jobs.seq LIMIT 1 FOR UPDATE OF jobs SKIP LOCKED",
        &models,
    )
    .await
}

/// The first job `pick` finds (given a waiting share `s` locked for it, and `$2`) in the
/// next [`BATCH_SHARES`] waiting shares, in turn order, whose share and group no one else
/// holds.
async fn first_in_turn(
    tx: &Transaction<'_>,
    pick: &str,
    arg: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<Option<Next>, QueueError> {
    let shares: Vec<String> = tx
        .query(
            "SELECT name FROM shares WHERE queued > 0 ORDER BY last_served LIMIT $1",
            &[&BATCH_SHARES],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    let sql = format!(
        "WITH s AS (SELECT name FROM shares WHERE name = $1 FOR UPDATE SKIP LOCKED),
         j AS ({pick}),
         g AS (
            SELECT groups.name FROM groups, j WHERE groups.name = j.group_key
            FOR UPDATE OF groups SKIP LOCKED)
         SELECT j.id, j.batch_key, j.group_key, (SELECT COUNT(*) FROM g) AS held FROM j"
    );
    for share in shares {
        let row = tx.query_opt(&sql, &[&share, arg]).await?;
        if let Some(row) = row {
            if row.try_get::<_, i64>("held")? == 1 {
                return Ok(Some(Next {
                    id: row.try_get("id")?,
                    batch_key: row.try_get("batch_key")?,
                    group: row.try_get("group_key")?,
                    share,
                }));
            }
        }
    }
    Ok(None)
}

/// Records that `next`'s share and group had their turn.
pub(crate) const TOOK_TURN_SQL: &str = "WITH stamp AS (SELECT nextval('turn_stamps') AS v),
     s AS (UPDATE shares SET last_served = (SELECT v FROM stamp) WHERE name = $1)
     UPDATE groups SET last_served = (SELECT v FROM stamp) WHERE name = $2";

/// Jobs leased before a job with `ahead` jobs before it in group `group` of share `share`
/// (see [`crate::position`] for the reasoning).
pub(crate) async fn position(
    client: &impl tokio_postgres::GenericClient,
    ahead: u64,
    group: &str,
    share: &str,
) -> Result<u64, QueueError> {
    let ahead = i64::try_from(ahead).unwrap_or(i64::MAX);
    let row = client
        .query_one(
            "SELECT
                (SELECT last_served FROM groups WHERE name = $1) AS group_stamp,
                (SELECT last_served FROM shares WHERE name = $2) AS share_stamp",
            &[&group, &share],
        )
        .await?;
    let group_stamp: i64 = row
        .try_get::<_, Option<i64>>("group_stamp")?
        .unwrap_or(i64::MAX);
    let share_stamp: i64 = row
        .try_get::<_, Option<i64>>("share_stamp")?
        .unwrap_or(i64::MAX);
    let others: i64 = client
        .query_one(
            "SELECT COALESCE(SUM(LEAST(queued, $1::BIGINT + (last_served < $2)::INT)), 0)::BIGINT
             FROM groups WHERE share = $3 AND queued > 0 AND name <> $4",
            &[&ahead, &group_stamp, &share, &group],
        )
        .await?
        .try_get(0)?;
    let in_share = ahead.saturating_add(others.max(0));
    if in_share == 0 {
        return shares_before(client, share_stamp).await;
    }
    let others: i64 = client
        .query_one(
            "SELECT COALESCE(SUM(LEAST(queued, $1::BIGINT + (last_served < $2)::INT)), 0)::BIGINT
             FROM shares WHERE queued > 0 AND name <> $3",
            &[&in_share, &share_stamp, &share],
        )
        .await?
        .try_get(0)?;
    Ok(in_share.saturating_add(others.max(0)) as u64)
}

/// How many waiting shares have a stamp older than `stamp`, counted from whichever end of
/// the round-robin is within reach.
async fn shares_before(
    client: &impl tokio_postgres::GenericClient,
    stamp: i64,
) -> Result<u64, QueueError> {
    let row = client
        .query_one(
            "SELECT
                (SELECT COUNT(*) FROM (SELECT 1 FROM shares
                    WHERE queued > 0 AND last_served < $1 LIMIT $2) o) AS older,
                (SELECT COUNT(*) FROM (SELECT 1 FROM shares
                    WHERE queued > 0 AND last_served >= $1 LIMIT $2) n) AS newer",
            &[&stamp, &COUNTED_FROM_AN_END],
        )
        .await?;
    let older: i64 = row.try_get("older")?;
    if older < COUNTED_FROM_AN_END {
        return Ok(older.max(0) as u64);
    }
    let newer: i64 = row.try_get("newer")?;
    let count: i64 = if newer < COUNTED_FROM_AN_END {
        // Every waiting share is older than `stamp`, or not.
        let waiting: i64 = client
            .query_one("SELECT COUNT(*) FROM shares WHERE queued > 0", &[])
            .await?
            .try_get(0)?;
        waiting - newer
    } else {
        client
            .query_one(
                "SELECT COUNT(*) FROM shares WHERE queued > 0 AND last_served < $1",
                &[&stamp],
            )
            .await?
            .try_get(0)?
    };
    Ok(count.max(0) as u64)
}
