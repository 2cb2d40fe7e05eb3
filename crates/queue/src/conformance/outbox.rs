//! The outbox, the limits counted with the insert, and the change feed.

use super::{enqueue_many, lease_one, new_job, VIS};
use crate::{CancelOutcome, JobQueue, ManualClock, Outbox, QueueError, ReplyTarget, Settle};
use std::sync::Arc;
use std::time::Duration;

const CLAIM: Duration = Duration::from_secs(30);

fn with_reply(group: &str, prompt: &str, payload: &str) -> crate::NewJob {
    let mut job = new_job(group, prompt);
    job.replies = vec![ReplyTarget::new("discord", payload.as_bytes().to_vec())];
    job
}

pub async fn replies_are_written_with_the_job_or_not_at_all<Q: JobQueue + Outbox>(
    q: Q,
    _c: ManualClock,
) {
    let mut job = with_reply("alice", "one", "token-1");
    job.replies.push(ReplyTarget::new(
        "webhook",
        b"https://example.com/hook".to_vec(),
    ));
    job.dedup_key = Some("k".into());
    let first = q.enqueue(job.clone()).await.expect("enqueue");
    let again = q.enqueue(job).await.expect("the same key again");
    assert_eq!((again.job.id, again.created), (first.job.id, false));
    let discord = q.claim("discord", 10, CLAIM).await.expect("claim");
    assert_eq!(discord.len(), 1, "a repeated submit owes no second answer");
    assert_eq!(
        (discord[0].job, discord[0].payload.as_slice()),
        (first.job.id, &b"token-1"[..])
    );
    assert_eq!(discord[0].attempts, 0);
    let hooks = q.claim("webhook", 10, CLAIM).await.expect("claim");
    assert_eq!(hooks.len(), 1, "each channel claims its own");
    assert_eq!(hooks[0].payload.as_slice(), b"https://example.com/hook");

    let mut refused = with_reply("alice", "two", "token-2");
    refused.owner_live_limit = Some(1);
    assert!(matches!(
        q.enqueue(refused).await,
        Err(QueueError::OwnerQuota { .. })
    ));
    assert!(
        q.deliveries_of(first.job.id).await.expect("of").len() == 2,
        "the refused job wrote nothing"
    );
    assert_eq!(q.outbox_stats().await.expect("stats").pending, 2);
}

pub async fn group_and_queue_limits_are_counted_with_the_insert<Q: JobQueue + Outbox>(
    q: Q,
    _c: ManualClock,
) {
    let limited = |prompt: &str, owner: &str| {
        let mut job = new_job("discord:7", prompt);
        job.owner = owner.into();
        job.group_live_limit = Some(2);
        job
    };
    q.enqueue(limited("a", "discord")).await.expect("first");
    let second = q.enqueue(limited("b", "discord")).await.expect("second");
    match q.enqueue(limited("c", "discord")).await {
        Err(QueueError::GroupQuota { live: 2, limit: 2 }) => {}
        other => panic!("a third live job of the group must be refused, got {other:?}"),
    }
    let mut elsewhere = limited("d", "discord");
    elsewhere.group = "discord:8".into();
    q.enqueue(elsewhere)
        .await
        .expect("another group has its own count");
    q.cancel(second.job.id).await.expect("cancel");
    q.enqueue(limited("e", "discord"))
        .await
        .expect("a finished job no longer counts");

    let mut capped = new_job("bob", "capped");
    capped.max_queued = Some(3);
    match q.enqueue(capped.clone()).await {
        Err(QueueError::QueueFull {
            queued: 3,
            limit: 3,
        }) => {}
        other => panic!("a full queue must refuse, got {other:?}"),
    }
    let _running = lease_one(&q, "w").await.expect("lease");
    q.enqueue(capped)
        .await
        .expect("running jobs are not queued");
}

pub async fn limits_hold_under_parallel_submits<Q: JobQueue + Outbox>(q: Q, _c: ManualClock) {
    let q = Arc::new(q);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut job = with_reply("discord:9", &format!("p{i}"), "t");
            job.owner = "discord".into();
            job.group_live_limit = Some(3);
            q.enqueue(job).await
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        match task.await.expect("join") {
            Ok(_) => accepted += 1,
            Err(QueueError::GroupQuota { limit: 3, .. }) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(accepted, 3, "8 parallel submits against a limit of 3");
    let claimed = q.claim("discord", 100, CLAIM).await.expect("claim");
    assert_eq!(claimed.len(), 3, "only accepted jobs owe an answer");
}

pub async fn a_delivery_has_one_claimer_at_a_time<Q: JobQueue + Outbox>(q: Q, c: ManualClock) {
    let job = q
        .enqueue(with_reply("alice", "one", "t"))
        .await
        .expect("enqueue")
        .job;
    let first = q.claim("discord", 10, CLAIM).await.expect("claim");
    assert_eq!(first.len(), 1);
    assert!(
        q.claim("discord", 10, CLAIM)
            .await
            .expect("claim")
            .is_empty(),
        "a claimed delivery is not claimed again"
    );
    c.advance_ms(CLAIM.as_millis() as i64);
    let second = q.claim("discord", 10, CLAIM).await.expect("claim");
    assert_eq!(second.len(), 1, "a claim that ran out is claimable again");
    assert_eq!(second[0].job, job.id);
    assert!(matches!(
        q.settle(&first[0].claim, Settle::Delivered).await,
        Err(QueueError::ClaimLost(_))
    ));
    q.unclaim(&second[0].claim).await.expect("unclaim");
    let third = q.claim("discord", 10, CLAIM).await.expect("claim");
    assert_eq!(third.len(), 1, "an unclaimed delivery is due at once");
    q.settle(&third[0].claim, Settle::Delivered)
        .await
        .expect("settle");
    c.advance_ms(3_600_000);
    assert!(
        q.claim("discord", 10, CLAIM)
            .await
            .expect("claim")
            .is_empty(),
        "delivered is final"
    );
}

pub async fn a_waiting_delivery_wakes_when_its_job_changes<Q: JobQueue + Outbox>(
    q: Q,
    c: ManualClock,
) {
    let job = q
        .enqueue(with_reply("alice", "one", "t"))
        .await
        .expect("enqueue")
        .job;
    let claimed = q.claim("discord", 10, CLAIM).await.expect("claim");
    q.settle(
        &claimed[0].claim,
        Settle::AwaitChange {
            not_before: Duration::from_secs(2),
            fallback: Duration::from_secs(3600),
            state: Some(b"Queued".to_vec()),
        },
    )
    .await
    .expect("settle");
    c.advance_ms(5_000);
    assert!(
        q.claim("discord", 10, CLAIM)
            .await
            .expect("claim")
            .is_empty(),
        "nothing changed: not due before its fallback"
    );
    let lease = lease_one(&q, "w").await.expect("lease");
    let woken = q.claim("discord", 10, CLAIM).await.expect("claim");
    assert_eq!(woken.len(), 1, "the job's lease made it due");
    assert_eq!(
        woken[0].state.as_deref().map(|s| s.as_slice()),
        Some(&b"Queued"[..])
    );
    q.settle(
        &woken[0].claim,
        Settle::AwaitChange {
            not_before: Duration::from_secs(2),
            fallback: Duration::from_secs(3600),
            state: None,
        },
    )
    .await
    .expect("settle");
    q.heartbeat(&lease.token, None, VIS).await.expect("beat");
    assert!(
        q.claim("discord", 10, CLAIM)
            .await
            .expect("claim")
            .is_empty(),
        "a heartbeat that changes nothing wakes nothing"
    );
    q.heartbeat(
        &lease.token,
        Some(sparkle_core::Progress { step: 1, total: 4 }),
        VIS,
    )
    .await
    .expect("beat");
    assert!(
        q.claim("discord", 10, CLAIM)
            .await
            .expect("claim")
            .is_empty(),
        "a change wakes it no sooner than not_before"
    );
    c.advance_ms(2_000);
    let woken = q.claim("discord", 10, CLAIM).await.expect("claim");
    assert_eq!(woken.len(), 1, "progress woke it, once not_before passed");
    assert_eq!(woken[0].job, job.id);

    // The job ends while the delivery is claimed (its progress edit in flight): the wait
    // that follows must not miss that change.
    assert_eq!(
        q.cancel(job.id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    q.settle(
        &woken[0].claim,
        Settle::AwaitChange {
            not_before: Duration::ZERO,
            fallback: Duration::from_secs(3600),
            state: Some(b"step 1/4".to_vec()),
        },
    )
    .await
    .expect("settle");
    let woken = q.claim("discord", 10, CLAIM).await.expect("claim");
    assert_eq!(
        woken.len(),
        1,
        "a change during the claim makes it due at once"
    );
}

pub async fn settled_deliveries_say_where_they_stand<Q: JobQueue + Outbox>(q: Q, c: ManualClock) {
    let job = q
        .enqueue(with_reply("alice", "one", "t"))
        .await
        .expect("enqueue")
        .job;
    let state = q.deliveries_of(job.id).await.expect("of");
    assert_eq!(state.len(), 1);
    assert_eq!(
        (
            state[0].channel.as_str(),
            state[0].status.as_str(),
            state[0].attempts
        ),
        ("discord", "pending", 0)
    );
    let claimed = q.claim("discord", 10, CLAIM).await.expect("claim");
    q.settle(
        &claimed[0].claim,
        Settle::Retry {
            after: Duration::from_secs(5),
            error: "HTTP 500".into(),
        },
    )
    .await
    .expect("settle");
    let state = &q.deliveries_of(job.id).await.expect("of")[0];
    assert_eq!(
        (state.attempts, state.last_error.as_deref()),
        (1, Some("HTTP 500"))
    );
    assert_eq!(state.next_attempt_at_ms, Some(super::T0 + 5_000));
    assert!(q
        .claim("discord", 10, CLAIM)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        q.outbox_stats().await.expect("stats").oldest_pending_age_ms,
        Some(0)
    );
    c.advance_ms(5_000);
    let claimed = q.claim("discord", 10, CLAIM).await.expect("claim");
    assert_eq!(claimed[0].attempts, 1);
    q.settle(
        &claimed[0].claim,
        Settle::Abandoned {
            reason: "the receiver is gone".into(),
        },
    )
    .await
    .expect("settle");
    let state = &q.deliveries_of(job.id).await.expect("of")[0];
    assert_eq!(
        (
            state.status.as_str(),
            state.last_error.as_deref(),
            state.next_attempt_at_ms
        ),
        ("abandoned", Some("the receiver is gone"), None)
    );
    assert_eq!(q.outbox_stats().await.expect("stats").pending, 0);
}

pub async fn every_visible_change_moves_the_change_counter<Q: JobQueue + Outbox>(
    q: Q,
    _c: ManualClock,
) {
    let start = q.revision().await.expect("revision");
    let ids = enqueue_many(&q, "alice", 2).await;
    let after_enqueue = q.revision().await.expect("revision");
    assert!(after_enqueue >= start + 2);
    let changed = q.changed_since(start, 10).await.expect("changes");
    assert_eq!(
        changed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        ids,
        "in commit order"
    );
    assert!(changed.windows(2).all(|w| w[0].1 < w[1].1));
    let lease = lease_one(&q, "w").await.expect("lease");
    let leased = q.changed_since(after_enqueue, 10).await.expect("changes");
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].0, lease.job.id);
    let job = q.get(lease.job.id).await.expect("get").expect("job");
    assert_eq!(job.revision, leased[0].1, "the job carries its revision");
    let before_beat = q.revision().await.expect("revision");
    q.heartbeat(&lease.token, None, VIS).await.expect("beat");
    assert_eq!(
        q.revision().await.expect("revision"),
        before_beat,
        "a heartbeat with nothing new is not a change"
    );
    q.heartbeat(
        &lease.token,
        Some(sparkle_core::Progress { step: 2, total: 4 }),
        VIS,
    )
    .await
    .expect("beat");
    q.complete(&lease.token, 1).await.expect("complete");
    assert_eq!(
        q.cancel(ids[1]).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    let rest = q.changed_since(before_beat, 10).await.expect("changes");
    assert_eq!(
        rest.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![lease.job.id, ids[1]],
        "a job appears once, at its latest change"
    );
    assert_eq!(
        q.changed_since(rest[1].1, 10).await.expect("changes"),
        vec![]
    );
    assert_eq!(q.changed_since(start, 1).await.expect("changes").len(), 1);
}

pub async fn positions_of_many_jobs_match_each_position<Q: JobQueue + Outbox>(
    q: Q,
    _c: ManualClock,
) {
    let mut ids = enqueue_many(&q, "alice", 3).await;
    ids.extend(enqueue_many(&q, "bob", 2).await);
    ids.extend(enqueue_many(&q, "carol", 1).await);
    let _ = lease_one(&q, "w").await.expect("lease");
    ids.extend(enqueue_many(&q, "alice", 1).await);
    ids.push(sparkle_core::JobId::random());
    let many = q.positions(&ids).await.expect("positions");
    for (id, position) in ids.iter().zip(&many) {
        assert_eq!(
            *position,
            q.position(*id).await.expect("position"),
            "job {id}"
        );
    }
    assert_eq!(many[0], None, "the leased job is not queued");
    assert_eq!(*many.last().expect("last"), None, "an unknown job has none");
    assert!(q.positions(&[]).await.expect("none").is_empty());
}
