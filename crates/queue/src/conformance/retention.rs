//! Deleting finished jobs, retention, and which images a job keeps.

use super::{lease_one, new_job, status, VIS};
use crate::{
    CancelOutcome, Clock, DeleteOutcome, Failure, JobQueue, KeptImages, ManualClock, Outbox,
    ReplyTarget,
};
use sparkle_core::JobStatus;

pub async fn a_finished_job_is_deleted_with_its_deliveries_and_a_live_one_is_not<
    Q: JobQueue + Outbox,
>(
    q: Q,
    _c: ManualClock,
) {
    let mut job = new_job("alice", "a corgi");
    job.replies = vec![ReplyTarget::new(
        "webhook",
        b"https://example.com/hook".to_vec(),
    )];
    let id = q.enqueue(job).await.expect("enqueue").job.id;
    assert_eq!(
        q.delete_finished(id).await.expect("delete"),
        DeleteOutcome::Live(JobStatus::Queued)
    );
    let lease = lease_one(&q, "w").await.expect("leased");
    assert_eq!(
        q.delete_finished(id).await.expect("delete"),
        DeleteOutcome::Live(JobStatus::Running)
    );
    q.complete(&lease.token, 1).await.expect("complete");
    assert_eq!(q.deliveries_of(id).await.expect("of").len(), 1);
    assert_eq!(
        q.delete_finished(id).await.expect("delete"),
        DeleteOutcome::Deleted
    );
    assert!(q.get(id).await.expect("get").is_none());
    assert!(q.deliveries_of(id).await.expect("of").is_empty());
    assert!(
        q.claim("webhook", 10, VIS).await.expect("claim").is_empty(),
        "nothing is delivered for a deleted job"
    );
    assert_eq!(
        q.delete_finished(id).await.expect("again"),
        DeleteOutcome::NotFound
    );
}

pub async fn retention_removes_only_jobs_finished_before_the_horizon<Q: JobQueue + Outbox>(
    q: Q,
    c: ManualClock,
) {
    let old_done = q
        .enqueue(new_job("a", "old"))
        .await
        .expect("enqueue")
        .job
        .id;
    let lease = lease_one(&q, "w").await.expect("leased");
    q.complete(&lease.token, 1).await.expect("complete");
    c.advance_ms(1);
    let old_cancelled = q
        .enqueue(new_job("b", "old"))
        .await
        .expect("enqueue")
        .job
        .id;
    assert_eq!(
        q.cancel(old_cancelled).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let still_queued = q
        .enqueue(new_job("c", "waiting"))
        .await
        .expect("enqueue")
        .job
        .id;
    c.advance_ms(10_000);
    let horizon = c.now_ms();
    let recent = q
        .enqueue(new_job("d", "recent"))
        .await
        .expect("enqueue")
        .job
        .id;
    q.cancel(recent).await.expect("cancel");

    let first = q.purge_finished(horizon, 1).await.expect("purge");
    assert_eq!(first, vec![old_done], "oldest first, at most `max`");
    let rest = q.purge_finished(horizon, 100).await.expect("purge");
    assert_eq!(rest, vec![old_cancelled]);
    assert!(q
        .purge_finished(horizon, 100)
        .await
        .expect("purge")
        .is_empty());
    assert_eq!(
        status(&q, still_queued).await,
        JobStatus::Queued,
        "live jobs stay"
    );
    assert_eq!(
        status(&q, recent).await,
        JobStatus::Cancelled,
        "recent ones stay"
    );
    assert_eq!(q.stats().await.expect("stats").queued, 1);
}

pub async fn kept_images_name_the_attempt_that_made_them<Q: JobQueue>(q: Q, c: ManualClock) {
    let retried = q
        .enqueue(new_job("a", "retried"))
        .await
        .expect("enqueue")
        .job
        .id;
    let first = lease_one(&q, "w").await.expect("leased");
    q.fail(
        &first.token,
        Failure {
            code: "device_lost".into(),
            message: "the image could not be made".into(),
            detail: None,
            retryable: true,
        },
    )
    .await
    .expect("fail");
    let cancelled = q
        .enqueue(new_job("b", "cancelled"))
        .await
        .expect("enqueue")
        .job
        .id;
    q.cancel(cancelled).await.expect("cancel");
    let gone = crate::conformance::new_job_id();
    assert_eq!(
        q.kept_images(&[retried, cancelled, gone])
            .await
            .expect("kept"),
        vec![KeptImages::Nothing; 3],
        "waiting for its next attempt, cancelled, or gone: none"
    );
    c.advance_ms(300_000);
    let second = lease_one(&q, "w").await.expect("leased again");
    assert_eq!(second.job.attempts, 2);
    assert_eq!(
        q.kept_images(&[retried]).await.expect("kept"),
        vec![KeptImages::Attempt(Some(2))],
        "the running attempt's"
    );
    q.complete(&second.token, 1).await.expect("complete");
    assert_eq!(
        q.kept_images(&[retried]).await.expect("kept"),
        vec![KeptImages::Attempt(Some(2))],
        "the completing attempt's"
    );
    let job = q.get(retried).await.expect("get").expect("exists");
    assert_eq!(job.images_attempt, Some(2));
}

pub async fn capacity_is_the_largest_a_worker_reported_within_a_week<Q: JobQueue>(
    q: Q,
    c: ManualClock,
) {
    assert_eq!(
        q.capacity("sd15").await.expect("capacity"),
        None,
        "none reported"
    );
    q.report_capacity("w1", "sd15", 1_000_000)
        .await
        .expect("report");
    q.report_capacity("w2", "sd15", 4_000_000)
        .await
        .expect("report");
    q.report_capacity("w3", "sdxl", 9_000_000)
        .await
        .expect("report");
    assert_eq!(q.capacity("sd15").await.expect("capacity"), Some(4_000_000));
    // A worker reporting again replaces what it said.
    q.report_capacity("w2", "sd15", 2_000_000)
        .await
        .expect("report");
    assert_eq!(q.capacity("sd15").await.expect("capacity"), Some(2_000_000));
    // One worker serving two models reports each; one report does not replace the other.
    q.report_capacity("w2", "sdxl", 12_000_000)
        .await
        .expect("report");
    assert_eq!(q.capacity("sd15").await.expect("capacity"), Some(2_000_000));
    assert_eq!(
        q.capacity("sdxl").await.expect("capacity"),
        Some(12_000_000)
    );
    c.advance_ms(8 * 86_400_000);
    assert_eq!(
        q.capacity("sd15").await.expect("capacity"),
        None,
        "too old to count"
    );
}
