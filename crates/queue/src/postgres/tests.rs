//! The PostgreSQL backend against a real server: the conformance suite, and what only
//! several processes at once or the database's own clock show. The server comes from
//! `scripts/postgres.sh start DIR` (the test script starts one and exports its settings).

use super::*;
use crate::conformance::new_job;
use crate::fields::testing::test_cipher;
use crate::{CancelOutcome, JobQueue, ManualClock};
use sparkle_core::JobStatus;

/// The test server's settings, each check in a schema of its own.
pub(crate) fn test_options() -> PgOptions {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: these tests need PostgreSQL. Start one with \
                 `scripts/postgres.sh start DIR` and export what it prints (scripts/test.sh does)"
            )
        })
    };
    let mut options = PgOptions::new(var("TEST_PG_URL"));
    options.ca_file = Some(var("TEST_PG_CA_FILE").into());
    options.password_file = Some(var("TEST_PG_PASSWORD_FILE").into());
    options
}

/// A fresh, empty schema on the test server; its name.
pub(crate) async fn fresh_schema() -> String {
    let options = test_options();
    let client = Connector::new(&options)
        .expect("connector")
        .connect()
        .await
        .expect("connect to the test server");
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE SCHEMA {name}"))
        .await
        .expect("create schema");
    name
}

/// Options for a queue in `schema` counting leases on `clock`.
pub(crate) fn in_schema(schema: &str, lease_clock: LeaseClock) -> PgOptions {
    PgOptions {
        search_path: Some(schema.to_string()),
        lease_clock,
        ..test_options()
    }
}

#[tokio::test]
async fn postgres_backend_passes_the_conformance_suite() {
    crate::conformance::run(|clock: ManualClock| async move {
        let schema = fresh_schema().await;
        PgQueue::open_with_clock(
            &in_schema(&schema, LeaseClock::Local),
            Arc::new(clock),
            test_cipher(),
        )
        .await
        .expect("open postgres queue")
    })
    .await;
}

#[tokio::test]
async fn leases_on_the_database_clock_expire_after_their_visibility() {
    let schema = fresh_schema().await;
    let q = PgQueue::open(&in_schema(&schema, LeaseClock::Database), test_cipher())
        .await
        .expect("open");
    q.enqueue(new_job("alice", "a")).await.expect("enqueue");
    let lease = q
        .lease("w", 1, Duration::from_millis(300))
        .await
        .expect("lease")
        .pop()
        .expect("a job");
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 0);
    q.heartbeat(&lease.token, None, Duration::from_millis(300))
        .await
        .expect("a live lease beats");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(q.reclaim_expired().await.expect("reclaim"), 1);
    assert!(matches!(
        q.complete(&lease.token, 1).await,
        Err(QueueError::LeaseLost(_))
    ));
}

#[tokio::test]
async fn migrations_applied_by_processes_starting_at_once_apply_once() {
    let schema = fresh_schema().await;
    let options = in_schema(&schema, LeaseClock::Database);
    let opens = (0..6).map(|_| PgQueue::open(&options, test_cipher()));
    for opened in futures::future::join_all(opens).await {
        opened.expect("every process opens the queue");
    }
    let q = PgQueue::open(&options, test_cipher()).await.expect("open");
    let client = q.client().await.expect("client");
    let applied: i64 = client
        .query_one("SELECT COUNT(*) FROM sparkle_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(applied, migrate::latest());
}

/// Two processes' queues on one fresh schema.
async fn two_processes() -> (PgQueue, PgQueue) {
    let schema = fresh_schema().await;
    let options = in_schema(&schema, LeaseClock::Database);
    let a = PgQueue::open(&options, test_cipher()).await.expect("open");
    let b = PgQueue::open(&options, test_cipher()).await.expect("open");
    (a, b)
}

const VISIBLE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_claimers_in_two_processes_never_lease_one_job_twice() {
    let (a, b) = two_processes().await;
    let jobs = 240;
    for i in 0..jobs {
        a.enqueue(new_job(&format!("share{}", i % 12), &format!("p{i}")))
            .await
            .expect("enqueue");
    }
    let claimers = (0..8).map(|n| {
        let q = if n % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move {
            let mut leased = Vec::new();
            loop {
                let got = q.lease(&format!("w{n}"), 3, VISIBLE).await.expect("lease");
                if got.is_empty() {
                    return leased;
                }
                leased.extend(got.into_iter().map(|l| l.job.id));
            }
        })
    });
    let mut all = Vec::new();
    for claimer in futures::future::join_all(claimers).await {
        all.extend(claimer.expect("claimer"));
    }
    let distinct: std::collections::BTreeSet<String> =
        all.iter().map(|id| id.to_string()).collect();
    assert_eq!(all.len(), jobs, "every job leased");
    assert_eq!(distinct.len(), jobs, "no job leased twice");
    assert_eq!(a.stats().await.expect("stats").running, jobs as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_take_consecutive_turns() {
    let (a, b) = two_processes().await;
    let shares = 4;
    for i in 0..shares * 6 {
        a.enqueue(new_job(&format!("share{}", i % shares), &format!("p{i}")))
            .await
            .expect("enqueue");
    }
    // Rounds of as many claimers at once as there are shares: whatever their interleaving,
    // each round serves every share once.
    for round in 0..6 {
        let claims = (0..shares).map(|n| {
            let q = if n % 2 == 0 { a.clone() } else { b.clone() };
            async move { q.lease("w", 1, VISIBLE).await.expect("lease") }
        });
        let owners: std::collections::BTreeSet<String> = futures::future::join_all(claims)
            .await
            .into_iter()
            .flatten()
            .map(|l| l.job.owner)
            .collect();
        assert_eq!(owners.len(), shares, "round {round}: {owners:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_a_complete_ends_one_way_only() {
    let (a, b) = two_processes().await;
    for _ in 0..20 {
        let job = a
            .enqueue(new_job("alice", "race"))
            .await
            .expect("enqueue")
            .job;
        let lease = a
            .lease("w", 1, VISIBLE)
            .await
            .expect("lease")
            .pop()
            .expect("a job");
        let (completed, cancelled) = tokio::join!(a.complete(&lease.token, 1), b.cancel(job.id));
        let status = b.get(job.id).await.expect("get").expect("job").status;
        match cancelled.expect("cancel") {
            CancelOutcome::Cancelled => {
                assert!(matches!(completed, Err(QueueError::LeaseLost(_))));
                assert_eq!(status, JobStatus::Cancelled);
            }
            CancelOutcome::AlreadyFinal(final_status) => {
                completed.expect("the complete came first");
                assert_eq!(
                    (final_status, status),
                    (JobStatus::Succeeded, JobStatus::Succeeded)
                );
            }
            CancelOutcome::NotFound => panic!("the job vanished"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_submits_of_one_idempotency_key_in_two_processes_make_one_job() {
    let (a, b) = two_processes().await;
    let submits = (0..24).map(|n| {
        let q = if n % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            let mut job = new_job("alice", "same");
            job.dedup_key = Some("idem-1".into());
            q.enqueue(job).await.expect("enqueue")
        }
    });
    let outcomes = futures::future::join_all(submits).await;
    let ids: std::collections::BTreeSet<String> =
        outcomes.iter().map(|e| e.job.id.to_string()).collect();
    assert_eq!(ids.len(), 1, "one job");
    assert_eq!(
        outcomes.iter().filter(|e| e.created).count(),
        1,
        "created once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_quota_holds_under_parallel_submits_in_two_processes() {
    let (a, b) = two_processes().await;
    let submits = (0..24).map(|n| {
        let q = if n % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            let mut job = new_job("alice", &format!("p{n}"));
            job.owner_live_limit = Some(3);
            job.group = format!("user{n}");
            q.enqueue(job).await
        }
    });
    let outcomes = futures::future::join_all(submits).await;
    let created = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Err(QueueError::OwnerQuota { limit: 3, .. })))
        .count();
    assert_eq!((created, refused), (3, 21), "{outcomes:?}");
    assert_eq!(a.stats().await.expect("stats").queued, 3);
}
