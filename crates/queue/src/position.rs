//! Queue positions under the two-level round-robin, in one statement that the database sums
//! over the counters of the waiting shares and groups (an aggregate over an index of those
//! waiting, no rows carried out): the cost does not grow with the queue's jobs or its history.
//!
//! A job with k queued jobs ahead in its own group is leased after those k, after up to k
//! jobs of every other group of its share — k + 1 for groups whose turn comes first (an older
//! stamp) — and, with a of its share's jobs leased before it that way, after up to a jobs of
//! every other share (a + 1 for shares whose turn comes first). k is counted up to
//! [`MAX_COUNTED_AHEAD`]: deeper in one group's own backlog, the position is a lower bound.

use crate::QueueError;
use sqlx::SqliteConnection;

/// Jobs ahead in its own group a position counts at most.
pub(crate) const MAX_COUNTED_AHEAD: i64 = 1000;

const POSITION_SQL: &str = "
WITH me AS (
    SELECT group_key, share_key, seq FROM jobs WHERE id = ?1 AND status = 'queued'
), ahead AS (
    SELECT COUNT(*) AS n FROM (
        SELECT 1 FROM jobs, me
        WHERE jobs.status = 'queued' AND jobs.group_key = me.group_key AND jobs.seq < me.seq
        LIMIT ?2)
), in_share AS (
    SELECT ahead.n + COALESCE((
        SELECT SUM(MIN(g.queued, ahead.n + (g.last_served < COALESCE(
            (SELECT last_served FROM groups WHERE name = me.group_key), 9223372036854775807))))
        FROM groups g
        WHERE g.share = me.share_key AND g.queued > 0 AND g.name != me.group_key), 0) AS n
    FROM ahead, me
)
SELECT in_share.n + COALESCE((
    SELECT SUM(MIN(s.queued, in_share.n + (s.last_served < COALESCE(
        (SELECT last_served FROM shares WHERE name = me.share_key), 9223372036854775807))))
    FROM shares s INDEXED BY shares_waiting
    WHERE s.queued > 0 AND s.name != me.share_key), 0) AS position
FROM in_share, me";

/// Jobs leased before job `id`, or `None` when it is not queued.
pub(crate) async fn position(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Option<u64>, QueueError> {
    let position: Option<i64> = sqlx::query_scalar(POSITION_SQL)
        .bind(id)
        .bind(MAX_COUNTED_AHEAD)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(position.map(|p| p.max(0) as u64))
}
