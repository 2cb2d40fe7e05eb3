//! Completions committed in groups, as submits are: every completion waiting while a group
//! commits joins the next one, one statement and one synchronous commit for all of them.

use super::connect::Pool;
use super::submit::retryable;
use crate::group_commit::MAX_GROUP;
use crate::group_commit::{answer, completion_outcomes, Completion, Reply, Submits, Writer};
use crate::QueueError;

/// Completes each job of the group whose lease is still held.
const COMPLETE_GROUP_SQL: &str = "UPDATE jobs SET status = 'succeeded', images = c.images,
        finished_at = c.now, updated_at = c.now, error_code = NULL, error_message = NULL,
        error_detail = NULL, lease_until = NULL, progress_step = progress_total,
        images_attempt = attempts
    FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[])
        AS c(id, lease, images, now, lease_now)
    WHERE jobs.id = c.id AND jobs.lease_id = c.lease AND jobs.status = 'running'
      AND jobs.lease_until > COALESCE(c.lease_now, sparkle_now_ms())
    RETURNING jobs.id, jobs.lease_id, jobs.images";

/// Times a group undone by a deadlock (two processes completing one job) is tried.
const ATTEMPTS: usize = 4;

impl Writer<(), Completion> {
    pub fn start(pool: Pool) -> Writer<(), Completion> {
        let (writer, receiver) = Writer::channel();
        tokio::spawn(run(pool, receiver));
        writer
    }
}

async fn run(pool: Pool, mut receiver: Submits<(), Completion>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let mut outcome = complete_group(&pool, &group).await;
        for _ in 1..ATTEMPTS {
            match &outcome {
                Err(QueueError::Postgres(e)) if retryable(e) => {
                    outcome = complete_group(&pool, &group).await;
                }
                _ => break,
            }
        }
        answer(&mut group, outcome, "completions");
    }
}

async fn complete_group(
    pool: &Pool,
    group: &[(Completion, Reply<()>)],
) -> Result<Vec<Result<(), QueueError>>, QueueError> {
    let client = super::get(pool).await?;
    let ids: Vec<String> = group.iter().map(|(c, _)| c.job.to_string()).collect();
    let leases: Vec<&str> = group.iter().map(|(c, _)| c.lease.as_str()).collect();
    let images: Vec<i64> = group.iter().map(|(c, _)| i64::from(c.images)).collect();
    let now: Vec<i64> = group.iter().map(|(c, _)| c.now).collect();
    let lease_now: Vec<Option<i64>> = group.iter().map(|(c, _)| c.lease_now).collect();
    let completed: Vec<(String, String, i64)> = client
        .query(
            COMPLETE_GROUP_SQL,
            &[&ids, &leases, &images, &now, &lease_now],
        )
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    let client = &client;
    completion_outcomes(group, &completed, |job, lease, images| async move {
        // A retry of a completion that committed (its answer lost with the connection).
        let before = client
            .query_opt(
                "SELECT 1 FROM jobs WHERE id = $1 AND lease_id = $2 AND status = 'succeeded'
                    AND images = $3 AND images_attempt = attempts",
                &[&job.to_string(), &lease, &images],
            )
            .await?;
        Ok(before.is_some())
    })
    .await
}
