//! The contract of [`JobQueue`], as checks every backend must pass.
//!
//! A backend's test calls [`run`] with a function that opens a fresh, empty queue driven by
//! the given [`ManualClock`]; each check gets its own queue, and a failure names the check.

mod fairness;
mod outbox;
mod retention;
mod sessions;

use fairness::*;
use outbox::*;
use retention::*;
use sessions::*;

use crate::{
    ApiKeys, CancelOutcome, Failure, HeartbeatOutcome, JobQueue, ManualClock, NewJob, Outbox,
    QueueError,
};
use sparkle_core::{JobStatus, Progress, RequestParts, Scheduler, ValidImageRequest};
use std::future::Future;
use std::time::Duration;

const T0: i64 = 1_700_000_000_000;
pub(crate) const VIS: Duration = Duration::from_millis(1000);

/// A small valid job in `group` (also its owner).
pub fn new_job(group: &str, prompt: &str) -> NewJob {
    NewJob {
        id: sparkle_core::JobId::random(),
        owner: group.to_string(),
        share: group.to_string(),
        group: group.to_string(),
        dedup_key: None,
        fingerprint: format!("{group}/{prompt}"),
        request: ValidImageRequest::from_parts(RequestParts {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            model: "tiny".into(),
            width: 64,
            height: 64,
            steps: 4,
            guidance_scale: 7.5,
            seed: 1,
            scheduler: Scheduler::Euler,
            n: 1,
            init: None,
            hires: None,
            loras: Vec::new(),
        })
        .expect("a valid request"),
        max_attempts: 3,
        owner_live_limit: None,
        group_live_limit: None,
        max_queued: None,
        replies: Vec::new(),
    }
}

/// An id no job has.
pub(crate) fn new_job_id() -> sparkle_core::JobId {
    sparkle_core::JobId::random()
}

type Check<Q> = fn(Q, ManualClock) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        fn all<Q: JobQueue + Outbox + ApiKeys>() -> Vec<(&'static str, Check<Q>)> {
            vec![$((stringify!($name), |q, c| Box::pin($name(q, c)))),*]
        }
    };
}

checks!(
    enqueue_commits_a_queued_job,
    dedup_key_returns_the_same_job,
    an_owner_over_its_live_limit_is_refused,
    fifo_within_a_group,
    fair_across_groups,
    lease_expires_exactly_at_its_boundary,
    heartbeat_extends_the_lease_and_records_progress,
    expired_leases_are_dead_lettered_after_max_attempts,
    failures_retry_then_dead_letter_or_fail_for_good,
    a_retry_waiting_out_its_backoff_is_live_cancellable_and_comes_back,
    a_wall_clock_jump_neither_expires_nor_revives_a_lease,
    a_lease_from_before_a_reboot_has_expired,
    cancel_a_queued_job,
    cancel_a_running_job,
    a_stale_lease_cannot_complete,
    release_returns_the_job_without_spending_an_attempt,
    batch_lease_takes_only_compatible_jobs,
    a_worker_leases_only_the_models_it_asks_for,
    an_owner_lists_its_own_jobs_newest_first_in_pages,
    stats_and_positions_describe_the_backlog,
    fresh_end_users_do_not_take_a_key_past_another_key,
    a_share_that_starts_waiting_queues_behind_those_waiting,
    end_users_take_turns_inside_their_key,
    no_share_waits_behind_two_jobs_of_another_in_any_mix,
    replies_are_written_with_the_job_or_not_at_all,
    group_and_queue_limits_are_counted_with_the_insert,
    limits_hold_under_parallel_submits,
    a_delivery_has_one_claimer_at_a_time,
    a_waiting_delivery_wakes_when_its_job_changes,
    settled_deliveries_say_where_they_stand,
    every_visible_change_moves_the_change_counter,
    positions_of_many_jobs_match_each_position,
    a_finished_job_is_deleted_with_its_deliveries_and_a_live_one_is_not,
    retention_removes_only_jobs_finished_before_the_horizon,
    kept_images_name_the_attempt_that_made_them,
    capacity_is_the_largest_a_worker_reported_within_a_week,
    a_session_acts_as_its_key_until_it_ends,
    a_revoked_key_ends_its_sessions_and_opens_none,
    a_key_keeps_its_newest_sessions_only,
);

/// Runs every check, each against a fresh queue from `open`.
pub async fn run<Q, F, Fut>(open: F)
where
    Q: JobQueue + Outbox + ApiKeys,
    F: Fn(ManualClock) -> Fut,
    Fut: Future<Output = Q>,
{
    for (name, check) in all::<Q>() {
        let clock = ManualClock::new(T0);
        let queue = open(clock.clone()).await;
        let outcome = tokio::spawn(check(queue, clock)).await;
        if let Err(e) = outcome {
            panic!("conformance check `{name}` failed: {e}");
        }
    }
}

pub(crate) async fn lease_one<Q: JobQueue>(q: &Q, worker: &str) -> Option<crate::Lease> {
    let mut leases = q.lease(worker, 1, VIS).await.expect("lease");
    assert!(leases.len() <= 1);
    leases.pop()
}

pub(crate) async fn status<Q: JobQueue>(q: &Q, id: sparkle_core::JobId) -> JobStatus {
    q.get(id).await.expect("get").expect("job exists").status
}

async fn enqueue_commits_a_queued_job<Q: JobQueue>(q: Q, _c: ManualClock) {
    let e = q
        .enqueue(new_job("alice", "a corgi"))
        .await
        .expect("enqueue");
    assert!(e.created);
    let job = q.get(e.job.id).await.expect("get").expect("exists");
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.created_at_ms, T0);
    assert_eq!(job.request.prompt, "a corgi");
    assert!(q
        .get(sparkle_core::JobId::random())
        .await
        .expect("get")
        .is_none());
}

async fn dedup_key_returns_the_same_job<Q: JobQueue>(q: Q, _c: ManualClock) {
    let keyed = |prompt: &str, owner: &str| NewJob {
        dedup_key: Some("key-1".into()),
        ..new_job(owner, prompt)
    };
    let first = q.enqueue(keyed("a corgi", "alice")).await.expect("first");
    let again = q.enqueue(keyed("a corgi", "alice")).await.expect("again");
    assert!(first.created && !again.created);
    assert_eq!(first.job.id, again.job.id);
    match q.enqueue(keyed("a cat", "alice")).await {
        Err(QueueError::IdempotencyConflict) => {}
        other => panic!("reused key with another request must conflict, got {other:?}"),
    }
    let other_owner = q.enqueue(keyed("a corgi", "bob")).await.expect("bob");
    assert!(other_owner.created);
    assert_ne!(other_owner.job.id, first.job.id);
    assert_eq!(q.stats().await.expect("stats").queued, 2);
}

async fn an_owner_over_its_live_limit_is_refused<Q: JobQueue>(q: Q, _c: ManualClock) {
    let limited = |prompt: &str, owner: &str, key: Option<&str>| NewJob {
        dedup_key: key.map(str::to_string),
        owner_live_limit: Some(2),
        ..new_job(owner, prompt)
    };
    let first = q
        .enqueue(limited("one", "alice", Some("k1")))
        .await
        .expect("first");
    let _leased = lease_one(&q, "w").await.expect("running counts too");
    q.enqueue(limited("two", "alice", None))
        .await
        .expect("second");
    match q.enqueue(limited("three", "alice", None)).await {
        Err(QueueError::OwnerQuota { live: 2, limit: 2 }) => {}
        other => panic!("a third live job must be refused, got {other:?}"),
    }
    let again = q
        .enqueue(limited("one", "alice", Some("k1")))
        .await
        .expect("a repeated key gets its job back");
    assert_eq!((again.job.id, again.created), (first.job.id, false));
    q.enqueue(limited("one", "bob", None))
        .await
        .expect("another owner has its own count");
    let unlimited = q
        .enqueue(new_job("alice", "unlimited"))
        .await
        .expect("no limit asked");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.queued, stats.running), (3, 1));
    for id in [first.job.id, unlimited.job.id] {
        assert_eq!(
            q.cancel(id).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
    }
    q.enqueue(limited("four", "alice", None))
        .await
        .expect("finished jobs no longer count");
}

async fn fifo_within_a_group<Q: JobQueue>(q: Q, c: ManualClock) {
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            q.enqueue(new_job("alice", &format!("p{i}")))
                .await
                .expect("enqueue")
                .job
                .id,
        );
        c.advance_ms(1);
    }
    for want in ids {
        let lease = lease_one(&q, "w").await.expect("a job");
        assert_eq!(lease.job.id, want);
        assert_eq!(lease.job.status, JobStatus::Running);
        assert_eq!(lease.job.attempts, 1);
    }
    assert!(lease_one(&q, "w").await.is_none());
}

async fn fair_across_groups<Q: JobQueue>(q: Q, _c: ManualClock) {
    for i in 0..5 {
        q.enqueue(new_job("alice", &format!("a{i}")))
            .await
            .expect("enqueue");
    }
    q.enqueue(new_job("bob", "b0")).await.expect("enqueue");
    q.enqueue(new_job("carol", "c0")).await.expect("enqueue");
    let mut order = Vec::new();
    while let Some(lease) = lease_one(&q, "w").await {
        order.push(lease.job.request.prompt);
    }
    assert_eq!(order, ["a0", "b0", "c0", "a1", "a2", "a3", "a4"]);
}

async fn lease_expires_exactly_at_its_boundary<Q: JobQueue>(q: Q, c: ManualClock) {
    let id = q
        .enqueue(new_job("alice", "p"))
        .await
        .expect("enqueue")
        .job
        .id;
    let first = lease_one(&q, "w1").await.expect("leased");
    c.set_ms(T0 + 999);
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 0);
    assert!(
        lease_one(&q, "w2").await.is_none(),
        "held one millisecond before the end"
    );
    c.set_ms(T0 + 1000);
    match q.complete(&first.token, 1).await {
        Err(QueueError::LeaseLost(lost)) => assert_eq!(lost, id),
        other => panic!("completing at the boundary must fail, got {other:?}"),
    }
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 1);
    let job = q.get(id).await.expect("get").expect("exists");
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(
        job.error.as_ref().map(|e| e.code.as_str()),
        Some("lease_expired")
    );
    c.advance_ms(300_000);
    let second = lease_one(&q, "w2").await.expect("leased again");
    assert_eq!(second.job.id, id);
    assert_eq!(second.job.attempts, 2);
}

async fn heartbeat_extends_the_lease_and_records_progress<Q: JobQueue>(q: Q, c: ManualClock) {
    let id = q
        .enqueue(new_job("alice", "p"))
        .await
        .expect("enqueue")
        .job
        .id;
    let lease = lease_one(&q, "w").await.expect("leased");
    c.set_ms(T0 + 800);
    let p = Progress { step: 3, total: 10 };
    assert_eq!(
        q.heartbeat(&lease.token, Some(p), VIS)
            .await
            .expect("heartbeat"),
        HeartbeatOutcome::Continue
    );
    c.set_ms(T0 + 1500);
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 0);
    let job = q.get(id).await.expect("get").expect("exists");
    assert_eq!((job.status, job.progress), (JobStatus::Running, Some(p)));
    q.heartbeat(&lease.token, None, VIS)
        .await
        .expect("heartbeat without progress");
    assert_eq!(
        q.get(id).await.expect("get").expect("exists").progress,
        Some(p)
    );
    c.set_ms(T0 + 2499);
    q.complete(&lease.token, 2)
        .await
        .expect("complete within the extended lease");
    let job = q.get(id).await.expect("get").expect("exists");
    assert_eq!((job.status, job.images), (JobStatus::Succeeded, 2));
    assert_eq!(job.finished_at_ms, Some(T0 + 2499));
}

async fn expired_leases_are_dead_lettered_after_max_attempts<Q: JobQueue>(q: Q, c: ManualClock) {
    let id = q
        .enqueue(NewJob {
            max_attempts: 2,
            ..new_job("alice", "poison")
        })
        .await
        .expect("enqueue")
        .job
        .id;
    q.enqueue(new_job("alice", "next")).await.expect("enqueue");
    for attempt in 1..=2 {
        let lease = lease_one(&q, "w").await.expect("leased");
        assert_eq!((lease.job.id, lease.job.attempts), (id, attempt));
        c.advance_ms(1000);
        q.reclaim_expired().await.expect("reclaim");
        // The retry waits out its backoff (at most five minutes).
        c.advance_ms(300_000);
    }
    let job = q.get(id).await.expect("get").expect("exists");
    assert_eq!(job.status, JobStatus::DeadLettered);
    let error = job.error.expect("reason kept");
    assert_eq!(error.code, "lease_expired");
    assert!(error.message.contains("2 of 2"), "{}", error.message);
    let lease = lease_one(&q, "w")
        .await
        .expect("the next job is not blocked");
    assert_eq!(lease.job.request.prompt, "next");
}

async fn failures_retry_then_dead_letter_or_fail_for_good<Q: JobQueue>(q: Q, c: ManualClock) {
    let flaky = Failure {
        code: "device_lost".into(),
        message: "GPU fell off".into(),
        detail: Some("cudaErrorDevicesUnavailable at /srv/engine.rs:12".into()),
        retryable: true,
    };
    let id = q
        .enqueue(NewJob {
            max_attempts: 2,
            ..new_job("alice", "p")
        })
        .await
        .expect("enqueue")
        .job
        .id;
    let lease = lease_one(&q, "w").await.expect("leased");
    assert_eq!(
        q.fail(&lease.token, flaky.clone()).await.expect("fail"),
        JobStatus::Queued
    );
    assert!(
        lease_one(&q, "w").await.is_none(),
        "a retry is not leased again at once"
    );
    assert_eq!(
        status(&q, id).await,
        JobStatus::Queued,
        "clients see it queued"
    );
    c.advance_ms(2_500);
    let lease = lease_one(&q, "w")
        .await
        .expect("leased again after its backoff");
    assert_eq!(
        q.fail(&lease.token, flaky).await.expect("fail"),
        JobStatus::DeadLettered
    );
    let job = q.get(id).await.expect("get").expect("exists");
    assert_eq!(
        job.error.map(|e| e.message),
        Some("GPU fell off".to_string())
    );

    let id = q
        .enqueue(new_job("bob", "q"))
        .await
        .expect("enqueue")
        .job
        .id;
    let lease = lease_one(&q, "w").await.expect("leased");
    let bad = Failure {
        code: "invalid_model".into(),
        message: "broken".into(),
        detail: None,
        retryable: false,
    };
    assert_eq!(
        q.fail(&lease.token, bad).await.expect("fail"),
        JobStatus::Failed
    );
    assert_eq!(status(&q, id).await, JobStatus::Failed);
    assert!(q
        .fail(
            &lease.token,
            Failure {
                code: "x".into(),
                detail: None,
                message: "y".into(),
                retryable: true
            }
        )
        .await
        .is_err());
}

async fn cancel_a_queued_job<Q: JobQueue>(q: Q, _c: ManualClock) {
    let id = q
        .enqueue(new_job("alice", "p"))
        .await
        .expect("enqueue")
        .job
        .id;
    assert_eq!(
        q.cancel(id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(status(&q, id).await, JobStatus::Cancelled);
    assert!(
        lease_one(&q, "w").await.is_none(),
        "a cancelled job is never leased"
    );
    assert_eq!(
        q.cancel(id).await.expect("cancel"),
        CancelOutcome::AlreadyFinal(JobStatus::Cancelled)
    );
    assert_eq!(
        q.cancel(sparkle_core::JobId::random())
            .await
            .expect("cancel"),
        CancelOutcome::NotFound
    );
}

async fn cancel_a_running_job<Q: JobQueue>(q: Q, _c: ManualClock) {
    let id = q
        .enqueue(new_job("alice", "p"))
        .await
        .expect("enqueue")
        .job
        .id;
    let lease = lease_one(&q, "w").await.expect("leased");
    assert_eq!(
        q.cancel(id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        q.heartbeat(&lease.token, None, VIS)
            .await
            .expect("heartbeat"),
        HeartbeatOutcome::Cancelled
    );
    assert!(matches!(
        q.complete(&lease.token, 1).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert_eq!(status(&q, id).await, JobStatus::Cancelled);
}

async fn a_stale_lease_cannot_complete<Q: JobQueue>(q: Q, c: ManualClock) {
    let id = q
        .enqueue(new_job("alice", "p"))
        .await
        .expect("enqueue")
        .job
        .id;
    let stale = lease_one(&q, "w1").await.expect("leased");
    c.advance_ms(1000);
    assert!(
        lease_one(&q, "w2").await.is_none(),
        "reclaimed, and waiting out its backoff"
    );
    c.advance_ms(300_000);
    let fresh = lease_one(&q, "w2").await.expect("reclaimed and leased");
    assert!(matches!(
        q.complete(&stale.token, 1).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert!(matches!(
        q.heartbeat(&stale.token, None, VIS).await,
        Err(QueueError::LeaseLost(_))
    ));
    q.complete(&fresh.token, 1)
        .await
        .expect("the holder completes");
    let revision = q.revision().await.expect("revision");
    // The holder retrying a completion whose answer it never got (the connection dropped
    // after the commit) is told it completed, and nothing changes.
    c.advance_ms(1000);
    q.complete(&fresh.token, 1)
        .await
        .expect("a retried completion succeeds");
    assert_eq!(q.revision().await.expect("revision"), revision, "unchanged");
    assert!(
        matches!(
            q.complete(&fresh.token, 2).await,
            Err(QueueError::LeaseLost(_))
        ),
        "a completion with other images is not a retry"
    );
    assert!(
        matches!(
            q.complete(&stale.token, 1).await,
            Err(QueueError::LeaseLost(_))
        ),
        "nor is one by an earlier attempt"
    );
    let job = q.get(id).await.expect("get").expect("exists");
    assert_eq!(
        (job.status, job.attempts, job.images),
        (JobStatus::Succeeded, 2, 1)
    );
    assert!(job.error.is_none());
}

async fn release_returns_the_job_without_spending_an_attempt<Q: JobQueue>(q: Q, _c: ManualClock) {
    let id = q
        .enqueue(new_job("alice", "p"))
        .await
        .expect("enqueue")
        .job
        .id;
    let lease = lease_one(&q, "w1").await.expect("leased");
    q.release(&lease.token).await.expect("release");
    let job = q.get(id).await.expect("get").expect("exists");
    assert_eq!((job.status, job.attempts), (JobStatus::Queued, 0));
    let again = lease_one(&q, "w2").await.expect("leased again");
    assert_eq!((again.job.id, again.job.attempts), (id, 1));
}

async fn batch_lease_takes_only_compatible_jobs<Q: JobQueue>(q: Q, _c: ManualClock) {
    let mut big = new_job("bob", "big");
    big.request.width = 128;
    q.enqueue(new_job("alice", "a0")).await.expect("enqueue");
    q.enqueue(big).await.expect("enqueue");
    q.enqueue(new_job("carol", "c0")).await.expect("enqueue");
    q.enqueue(new_job("alice", "a1")).await.expect("enqueue");
    let batch = q.lease("w", 8, VIS).await.expect("lease");
    let prompts: Vec<_> = batch
        .iter()
        .map(|l| l.job.request.prompt.as_str())
        .collect();
    assert_eq!(prompts, ["a0", "c0", "a1"]);
    let rest = q.lease("w", 8, VIS).await.expect("lease");
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].job.request.prompt, "big");

    // Filling a started batch takes only jobs with its key, in fairness order.
    let key = batch[0].job.request.batch_key();
    q.enqueue(new_job("dave", "d0")).await.expect("enqueue");
    let mut other = new_job("erin", "e0");
    other.request.steps = 9;
    q.enqueue(other).await.expect("enqueue");
    q.enqueue(new_job("alice", "a2")).await.expect("enqueue");
    let more = q.lease_compatible("w", &key, 8, VIS).await.expect("lease");
    let prompts: Vec<_> = more.iter().map(|l| l.job.request.prompt.as_str()).collect();
    assert_eq!(prompts, ["d0", "a2"]);
    assert!(q
        .lease_compatible("w", &key, 8, VIS)
        .await
        .expect("lease")
        .is_empty());
}

/// A small valid job in `group` for `model`.
pub fn job_for_model(group: &str, prompt: &str, model: &str) -> NewJob {
    let mut job = new_job(group, prompt);
    job.request.model = model.to_string();
    job
}

async fn a_worker_leases_only_the_models_it_asks_for<Q: JobQueue>(q: Q, _c: ManualClock) {
    q.enqueue(job_for_model("alice", "a-xl", "sdxl"))
        .await
        .expect("enqueue");
    q.enqueue(job_for_model("alice", "a-15", "sd15"))
        .await
        .expect("enqueue");
    q.enqueue(job_for_model("bob", "b-xl", "sdxl"))
        .await
        .expect("enqueue");
    q.enqueue(job_for_model("carol", "c-15", "sd15"))
        .await
        .expect("enqueue");
    q.enqueue(job_for_model("alice", "a-15b", "sd15"))
        .await
        .expect("enqueue");
    let only = |models: &[&str]| models.iter().map(|m| m.to_string()).collect::<Vec<_>>();

    // Nothing of a model no one asked for, ever.
    assert!(q
        .lease_models("w", &only(&["sd2"]), 8, VIS)
        .await
        .expect("lease")
        .is_empty());
    // Alice's sdxl job is her group's head, yet a worker of sd15 takes her sd15 jobs (FIFO
    // among them), in turn with carol's.
    let sd15 = q
        .lease_models("w15", &only(&["sd15"]), 8, VIS)
        .await
        .expect("lease");
    let prompts: Vec<_> = sd15.iter().map(|l| l.job.request.prompt.as_str()).collect();
    assert_eq!(prompts, ["a-15", "c-15", "a-15b"]);
    assert!(sd15.iter().all(|l| l.job.request.model == "sd15"));
    // A worker of both takes the next in turn of either: bob's share comes before alice's
    // second turn.
    let both = q
        .lease_models("wx", &only(&["sd15", "sdxl"]), 1, VIS)
        .await
        .expect("lease");
    assert_eq!(both.len(), 1);
    assert_eq!(both[0].job.request.model, "sdxl");
    let rest = q
        .lease_models("wx", &only(&["sdxl"]), 8, VIS)
        .await
        .expect("lease");
    assert_eq!(rest.len(), 1);
    assert_eq!(q.stats().await.expect("stats").queued, 0);
}

async fn an_owner_lists_its_own_jobs_newest_first_in_pages<Q: JobQueue>(q: Q, c: ManualClock) {
    let mut mine = Vec::new();
    for i in 0..5 {
        c.advance_ms(10);
        mine.push(
            q.enqueue(new_job("alice", &format!("a{i}")))
                .await
                .expect("enqueue")
                .job
                .id,
        );
        q.enqueue(new_job("bob", &format!("b{i}")))
            .await
            .expect("enqueue");
    }
    let page = q.list_jobs("alice", None, None, 3).await.expect("list");
    let ids: Vec<_> = page.iter().map(|j| j.id).collect();
    assert_eq!(ids, [mine[4], mine[3], mine[2]], "newest first");
    let rest = q
        .list_jobs("alice", None, Some(mine[2]), 3)
        .await
        .expect("list");
    let ids: Vec<_> = rest.iter().map(|j| j.id).collect();
    assert_eq!(ids, [mine[1], mine[0]]);
    assert!(rest.iter().all(|j| j.owner == "alice"));
    // A cursor of another owner's job shows nothing of theirs, and nothing at all.
    let bobs = q.list_jobs("bob", None, None, 1).await.expect("list")[0].id;
    assert!(q
        .list_jobs("alice", None, Some(bobs), 10)
        .await
        .expect("list")
        .is_empty());
    // By status: one of alice's jobs running, one cancelled.
    let lease = q
        .lease("w", 1, VIS)
        .await
        .expect("lease")
        .pop()
        .expect("a lease");
    assert_eq!(lease.job.owner, "alice");
    q.cancel(mine[4]).await.expect("cancel");
    let running = q
        .list_jobs("alice", Some(JobStatus::Running), None, 10)
        .await
        .expect("list");
    assert_eq!(
        running.iter().map(|j| j.id).collect::<Vec<_>>(),
        [lease.job.id]
    );
    let cancelled = q
        .list_jobs("alice", Some(JobStatus::Cancelled), None, 10)
        .await
        .expect("list");
    assert_eq!(
        cancelled.iter().map(|j| j.id).collect::<Vec<_>>(),
        [mine[4]]
    );
    let queued = q
        .list_jobs("alice", Some(JobStatus::Queued), None, 10)
        .await
        .expect("list");
    assert_eq!(queued.len(), 3);
}

async fn stats_and_positions_describe_the_backlog<Q: JobQueue>(q: Q, c: ManualClock) {
    let a: Vec<_> = enqueue_many(&q, "alice", 3).await;
    c.advance_ms(500);
    let b = q
        .enqueue(new_job("bob", "b0"))
        .await
        .expect("enqueue")
        .job
        .id;
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.queued, stats.running), (4, 0));
    let each = new_job("x", "y").request.cost();
    assert!(each > 0.0);
    assert!((stats.queued_cost - 4.0 * each).abs() < 1e-9, "{stats:?}");
    assert_eq!(stats.running_cost, 0.0);
    assert_eq!(q.live_in_group("alice").await.expect("live"), 3);
    assert_eq!(q.live_in_group("nobody").await.expect("live"), 0);
    assert_eq!(stats.oldest_queued_age_ms, Some(500));
    assert_eq!(q.position(a[0]).await.expect("position"), Some(0));
    assert_eq!(q.position(b).await.expect("position"), Some(1));
    assert_eq!(q.position(a[2]).await.expect("position"), Some(3));
    let lease = lease_one(&q, "w").await.expect("leased");
    assert_eq!(q.position(lease.job.id).await.expect("position"), None);
    let stats = q.stats().await.expect("stats");
    assert!((stats.queued_cost - 3.0 * each).abs() < 1e-9, "{stats:?}");
    assert!((stats.running_cost - each).abs() < 1e-9, "{stats:?}");
    c.advance_ms(250);
    q.complete(&lease.token, 1).await.expect("complete");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.queued, stats.running), (3, 0));
    assert_eq!(stats.recent_run_ms, Some(250.0));
    let rate = stats.recent_units_per_sec.expect("a rate");
    assert!((rate - each / 0.25).abs() < 1e-6, "{stats:?}");
}

pub(crate) async fn enqueue_many<Q: JobQueue>(
    q: &Q,
    group: &str,
    n: usize,
) -> Vec<sparkle_core::JobId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            q.enqueue(new_job(group, &format!("{group}{i}")))
                .await
                .expect("enqueue")
                .job
                .id,
        );
    }
    ids
}

async fn a_retry_waiting_out_its_backoff_is_live_cancellable_and_comes_back<Q: JobQueue>(
    q: Q,
    c: ManualClock,
) {
    let flaky = Failure {
        code: "store_unavailable".into(),
        message: "the image store could not be written".into(),
        detail: Some("/var/lib/sparkle/images: disk full".into()),
        retryable: true,
    };
    let mut limited = new_job("alice", "first");
    limited.owner_live_limit = Some(2);
    let first = q.enqueue(limited.clone()).await.expect("enqueue").job.id;
    assert_eq!(first, limited.id, "a job has the id its submitter chose");
    let lease = lease_one(&q, "w").await.expect("leased");
    q.fail(&lease.token, flaky.clone()).await.expect("fail");
    let job = q.get(first).await.expect("get").expect("exists");
    assert_eq!(job.status, JobStatus::Queued);
    let error = job.error.expect("the reason is kept");
    assert_eq!(error.code, "store_unavailable");
    assert!(
        !error.message.contains('/'),
        "a client-facing message names no path: {}",
        error.message
    );

    // Waiting for its retry, it still counts against its owner's live jobs.
    limited.id = new_job_id();
    limited.request.prompt = "second".into();
    limited.fingerprint = "alice/second".into();
    q.enqueue(limited.clone()).await.expect("second fits");
    limited.id = new_job_id();
    limited.request.prompt = "third".into();
    limited.fingerprint = "alice/third".into();
    assert!(matches!(
        q.enqueue(limited).await,
        Err(QueueError::OwnerQuota { live: 2, limit: 2 })
    ));

    // Its wait ends with no worker leasing: reclaiming makes it queued again.
    let second = lease_one(&q, "w").await.expect("the other job is leasable");
    assert_ne!(second.job.id, first);
    c.advance_ms(2_500);
    q.reclaim_expired().await.expect("reclaim");
    assert_eq!(q.position(first).await.expect("position"), Some(0));

    // And one waiting can be cancelled.
    let lease = lease_one(&q, "w").await.expect("leased again");
    assert_eq!(lease.job.id, first);
    q.fail(&lease.token, flaky).await.expect("fail again");
    assert_eq!(
        q.cancel(first).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    c.advance_ms(600_000);
    q.reclaim_expired().await.expect("reclaim");
    assert_eq!(status(&q, first).await, JobStatus::Cancelled);
}

async fn a_wall_clock_jump_neither_expires_nor_revives_a_lease<Q: JobQueue>(q: Q, c: ManualClock) {
    let id = q
        .enqueue(new_job("alice", "a corgi"))
        .await
        .expect("enqueue")
        .job
        .id;
    let lease = lease_one(&q, "w").await.expect("leased");
    // Forward an hour: the lease (one second long) is still live.
    c.jump_wall_ms(T0 + 3_600_000);
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 0);
    assert_eq!(
        q.heartbeat(&lease.token, None, VIS)
            .await
            .expect("heartbeat"),
        HeartbeatOutcome::Continue
    );
    // Back two hours, then the lease's second passes: it has expired all the same.
    c.jump_wall_ms(T0 - 7_200_000);
    c.advance_ms(1_001);
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 1);
    assert!(matches!(
        q.complete(&lease.token, 1).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert_eq!(status(&q, id).await, JobStatus::Queued);
}

async fn a_lease_from_before_a_reboot_has_expired<Q: JobQueue>(q: Q, c: ManualClock) {
    q.enqueue(new_job("alice", "a corgi"))
        .await
        .expect("enqueue");
    let lease = lease_one(&q, "w").await.expect("leased");
    // Long-lived, then the host boots again: its monotonic clock starts near zero.
    assert_eq!(
        q.heartbeat(&lease.token, None, Duration::from_secs(3_600))
            .await
            .expect("heartbeat"),
        HeartbeatOutcome::Continue
    );
    c.reboot();
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 1);
    assert!(matches!(
        q.heartbeat(&lease.token, None, VIS).await,
        Err(QueueError::LeaseLost(_))
    ));
    // Leases of the new boot work as ever.
    c.advance_ms(300_000);
    let again = lease_one(&q, "w2").await.expect("leased again");
    c.advance_ms(999);
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 0);
    q.complete(&again.token, 1).await.expect("complete");
}
