//! The PostgreSQL backend against a real server: the conformance suite, and what only
//! several processes at once or the database's own clock show. The server comes from
//! `scripts/postgres.sh start DIR` (the test script starts one and exports its settings).

use super::*;
use crate::conformance::new_job;
use crate::fields::testing::test_cipher;
use crate::{JobQueue, ManualClock};

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
