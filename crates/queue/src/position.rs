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
    let others: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(MIN(queued, ?1 + (last_served < ?2))), 0) FROM shares
         INDEXED BY shares_waiting_counts WHERE queued > 0 AND name != ?3",
    )
    .bind(in_share as i64)
    .bind(share_stamp.unwrap_or(i64::MAX))
    .bind(share)
    .fetch_one(&mut *conn)
    .await?;
    Ok(in_share + others.max(0) as u64)
}
