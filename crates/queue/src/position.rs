//! Queue positions under the two-level round-robin, summed by the database over the counters
//! of the waiting shares and groups (one aggregate over an index of those waiting, no rows
//! carried out): the cost does not grow with the queue's jobs or its history.
//!
//! A job with k queued jobs ahead in its own group is leased after those k, after up to k
//! jobs of every other group of its share — k + 1 for groups whose turn comes first (an older
//! stamp) — and, with a of its share's jobs leased before it that way, after up to a jobs of
//! every other share (a + 1 for shares whose turn comes first). k is counted up to a bound
//! (1000): deeper in one group's own backlog, the position is a lower bound.

use crate::QueueError;
use sqlx::SqliteConnection;

/// Jobs leased before a job with `ahead` jobs before it in group `group` of share `share`.
pub(crate) async fn position(
    conn: &mut SqliteConnection,
    ahead: u64,
    group: &str,
    share: &str,
) -> Result<u64, QueueError> {
    let group_stamp: Option<i64> =
        sqlx::query_scalar("SELECT last_served FROM groups WHERE name = ?1")
            .bind(group)
            .fetch_optional(&mut *conn)
            .await?;
    let others: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(MIN(queued, ?1 + (last_served < ?2))), 0)
         FROM groups INDEXED BY groups_waiting_counts
         WHERE share = ?3 AND queued > 0 AND name != ?4",
    )
    .bind(ahead as i64)
    .bind(group_stamp.unwrap_or(i64::MAX))
    .bind(share)
    .bind(group)
    .fetch_one(&mut *conn)
    .await?;
    let in_share = ahead + others.max(0) as u64;
    let share_stamp: Option<i64> =
        sqlx::query_scalar("SELECT last_served FROM shares WHERE name = ?1")
            .bind(share)
            .fetch_optional(&mut *conn)
            .await?;
    let stamp = share_stamp.unwrap_or(i64::MAX);
    if in_share == 0 {
        // Its share's next turn: every other waiting share with an older stamp goes first,
        // one job each. Counted from whichever end of the round-robin is nearer.
        return shares_before(conn, stamp).await;
    }
    let others: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(MIN(queued, ?1 + (last_served < ?2))), 0) FROM shares
         INDEXED BY shares_waiting_counts WHERE queued > 0 AND name != ?3",
    )
    .bind(in_share as i64)
    .bind(stamp)
    .bind(share)
    .fetch_one(&mut *conn)
    .await?;
    Ok(in_share + others.max(0) as u64)
}

/// Waiting shares counted at most from one end before the other end is tried.
pub(crate) const COUNTED_FROM_AN_END: i64 = 2000;

/// Jobs ahead in its own group a position counts at most.
pub(crate) const MAX_COUNTED_AHEAD: i64 = 1000;

/// How many waiting shares have a stamp older than `stamp`: counted from the front, or the
/// waiting ones not older counted from the back and taken from the count of all waiting, whichever end is within reach; the whole range
/// only when neither is.
async fn shares_before(conn: &mut SqliteConnection, stamp: i64) -> Result<u64, QueueError> {
    let bounded = |newer: bool| {
        let range = if newer {
            "last_served >= ?1"
        } else {
            "last_served < ?1"
        };
        format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM shares INDEXED BY shares_waiting_counts
             WHERE queued > 0 AND {range} LIMIT ?2)"
        )
    };
    let older: i64 = sqlx::query_scalar(&bounded(false))
        .bind(stamp)
        .bind(COUNTED_FROM_AN_END)
        .fetch_one(&mut *conn)
        .await?;
    if older < COUNTED_FROM_AN_END {
        return Ok(older.max(0) as u64);
    }
    let newer: i64 = sqlx::query_scalar(&bounded(true))
        .bind(stamp)
        .bind(COUNTED_FROM_AN_END)
        .fetch_one(&mut *conn)
        .await?;
    if newer < COUNTED_FROM_AN_END {
        let waiting: i64 = sqlx::query_scalar("SELECT waiting_shares FROM queue_counts")
            .fetch_one(&mut *conn)
            .await?;
        // Every waiting share is older than `stamp`, or not (the one holding it included).
        return Ok((waiting - newer).max(0) as u64);
    }
    let older: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM shares INDEXED BY shares_waiting_counts
         WHERE queued > 0 AND last_served < ?1",
    )
    .bind(stamp)
    .fetch_one(&mut *conn)
    .await?;
    Ok(older.max(0) as u64)
}
