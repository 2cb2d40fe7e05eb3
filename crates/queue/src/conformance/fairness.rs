//! Fair shares: an API key (or a Discord user) is a share, its end users only order jobs
//! inside it, and a share that starts waiting never jumps the ones already waiting.

use super::{lease_one, new_job};
use crate::{JobQueue, ManualClock};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// A job of share `share`, group `group` inside it.
fn job_of(share: &str, group: &str, prompt: &str) -> crate::NewJob {
    let mut job = new_job(group, prompt);
    job.owner = share.to_string();
    job.share = share.to_string();
    job
}

pub async fn fresh_end_users_do_not_take_a_key_past_another_key<Q: JobQueue>(
    q: Q,
    _c: ManualClock,
) {
    // Key A names a new end user on every request; key B asks once, after them.
    for i in 0..8 {
        q.enqueue(job_of("key_a", &format!("key_a:user{i}"), &format!("a{i}")))
            .await
            .expect("enqueue");
    }
    q.enqueue(job_of("key_b", "key_b", "b0"))
        .await
        .expect("enqueue");
    let first_two: Vec<String> = [
        lease_one(&q, "w").await.expect("lease"),
        lease_one(&q, "w").await.expect("lease"),
    ]
    .into_iter()
    .map(|l| l.job.request.prompt)
    .collect();
    assert_eq!(
        first_two,
        ["a0", "b0"],
        "B waits behind one job of A, not eight"
    );
}

pub async fn a_share_that_starts_waiting_queues_behind_those_waiting<Q: JobQueue>(
    q: Q,
    _c: ManualClock,
) {
    for i in 0..3 {
        q.enqueue(job_of("alice", "alice", &format!("a{i}")))
            .await
            .expect("enqueue");
        q.enqueue(job_of("bob", "bob", &format!("b{i}")))
            .await
            .expect("enqueue");
    }
    let mut order = Vec::new();
    for _ in 0..2 {
        order.push(lease_one(&q, "w").await.expect("lease").job.request.prompt);
    }
    q.enqueue(job_of("carol", "carol", "c0"))
        .await
        .expect("enqueue");
    while let Some(lease) = lease_one(&q, "w").await {
        order.push(lease.job.request.prompt);
    }
    assert_eq!(order, ["a0", "b0", "a1", "b1", "c0", "a2", "b2"]);
}

pub async fn end_users_take_turns_inside_their_key<Q: JobQueue>(q: Q, _c: ManualClock) {
    for (group, prompt) in [
        ("k:u1", "u1a"),
        ("k:u1", "u1b"),
        ("k:u1", "u1c"),
        ("k:u2", "u2a"),
    ] {
        q.enqueue(job_of("k", group, prompt))
            .await
            .expect("enqueue");
    }
    let mut order = Vec::new();
    while let Some(lease) = lease_one(&q, "w").await {
        order.push(lease.job.request.prompt);
    }
    assert_eq!(order, ["u1a", "u2a", "u1b", "u1c"]);
}

/// Random mixes of submissions (fresh and known end users, four shares) and leases: while a
/// share has queued jobs and has not had its turn, no other share is leased twice.
pub async fn no_share_waits_behind_two_jobs_of_another_in_any_mix<Q: JobQueue>(
    q: Q,
    _c: ManualClock,
) {
    const SHARES: [&str; 4] = ["s0", "s1", "s2", "s3"];
    for seed in 0..24u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut queued: BTreeMap<&str, u64> = BTreeMap::new();
        // For each waiting share: leases each other share had since it started waiting.
        let mut waited: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
        let mut fresh = 0;
        for step in 0..60 {
            if rng.gen_bool(0.55) {
                let share = SHARES[rng.gen_range(0..SHARES.len())];
                let group = if rng.gen_bool(0.5) {
                    fresh += 1;
                    format!("{share}:fresh{seed}-{fresh}")
                } else {
                    format!("{share}:user{}", rng.gen_range(0..2))
                };
                q.enqueue(job_of(share, &group, &format!("{seed}/{step}")))
                    .await
                    .expect("enqueue");
                let n = queued.entry(share).or_default();
                if *n == 0 {
                    waited.insert(share, BTreeMap::new());
                }
                *n += 1;
            } else if let Some(lease) = lease_one(&q, "w").await {
                let share = SHARES
                    .iter()
                    .copied()
                    .find(|s| lease.job.owner == *s)
                    .expect("a known share");
                for (waiting, others) in waited.iter_mut().filter(|(s, _)| **s != share) {
                    let n = others.entry(share).or_default();
                    *n += 1;
                    assert!(
                        *n <= 1,
                        "seed {seed} step {step}: {waiting} waited behind two jobs of {share}"
                    );
                }
                let left = queued.entry(share).or_default();
                *left -= 1;
                if *left == 0 {
                    waited.remove(share);
                } else {
                    waited.insert(share, BTreeMap::new());
                }
                q.complete(&lease.token, 1).await.expect("complete");
            }
        }
        // An empty queue for the next mix.
        while let Some(lease) = lease_one(&q, "w").await {
            q.complete(&lease.token, 1).await.expect("complete");
        }
    }
}
