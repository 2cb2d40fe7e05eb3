//! The PostgreSQL backend: the queue and its metadata on a database any number of gateways
//! and workers share, for when one machine is not enough.
//!
//! Connections come from a pool whose every new connection reads the password file anew
//! ([`connect`]), over TLS verified against the configured CA, to whichever listed host takes
//! writes (`target_session_attrs=read-write`). A connection that breaks is dropped from the
//! pool and the next call opens another, so a restarted or promoted server is picked up by
//! the next call; until then calls fail with [`QueueError::Unavailable`].
//!
//! Claims take the share whose turn it is with `FOR UPDATE SKIP LOCKED`, then its group and
//! that group's oldest job the same way, so concurrent claimers take consecutive turns and
//! never wait on one another. Commits that change a job notify (`LISTEN/NOTIFY`) the workers
//! waiting for work and every process following job events; both also wake on a timeout.
//! Migrations are embedded and applied under an advisory lock, so processes starting at once
//! apply each one once. See `migrations/postgres/0001_schema.sql` for the order locks are
//! taken in.

mod claim;
mod complete;
pub(crate) mod connect;
mod jobs;
mod keys;
mod migrate;
mod outbox;
mod sealing;
mod submit;

pub use connect::{server_certificates, DatabaseUrl};

use crate::fields::FieldCipher;
use crate::{Clock, QueueError, SystemClock};
use connect::{Connector, Manager, Pool};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// Which clock leases are counted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseClock {
    /// The database server's: one clock for every host (the default).
    Database,
    /// This host's monotonic clock with an offset per boot, read from the queue's [`Clock`]:
    /// for a database only one host uses, and for tests that move time by hand.
    Local,
}

/// How to reach and use the database.
#[derive(Clone)]
pub struct PgOptions {
    /// A `postgres://` connection string; several hosts may be listed
    /// (`postgres://u@a:5432,b:5432/db?target_session_attrs=read-write`).
    pub url: String,
    /// The CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Where the password is, read for each new connection.
    pub password_file: Option<PathBuf>,
    /// Apply pending migrations when opening (needs a role that may create tables).
    pub migrate: bool,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    /// How long a call waits for a free connection before the database counts as
    /// unavailable.
    pub acquire_timeout: Duration,
    /// See [`SqliteOptions::retry_backoff`](crate::SqliteOptions::retry_backoff).
    pub retry_backoff: Duration,
    pub lease_clock: LeaseClock,
    /// The schema to work in (`search_path`); the role's default when unset.
    pub search_path: Option<String>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password: only its hosts are shown.
        f.debug_struct("PgOptions")
            .field(
                "hosts",
                &DatabaseUrl::parse(&self.url).map(|u| u.hosts()).ok(),
            )
            .field("ca_file", &self.ca_file)
            .field("password_file", &self.password_file)
            .field("lease_clock", &self.lease_clock)
            .finish_non_exhaustive()
    }
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> PgOptions {
        PgOptions {
            url: url.into(),
            ca_file: None,
            password_file: None,
            migrate: true,
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            retry_backoff: Duration::from_secs(2),
            lease_clock: LeaseClock::Database,
            search_path: None,
        }
    }
}

/// What a connection to the database may do, as `sparkle audit` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub role: String,
    pub superuser: bool,
    pub may_create_roles: bool,
    pub may_create_databases: bool,
    /// May create objects in the schema (it could change the schema, not only rows).
    pub may_change_schema: bool,
    /// Owns the queue's tables (the migrations' role).
    pub owns_tables: bool,
    pub server_version: String,
    /// The server says this connection is encrypted.
    pub tls: bool,
}

#[derive(Clone)]
pub struct PgQueue {
    pub(crate) pool: Pool,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) fields: Arc<dyn FieldCipher>,
    connector: Connector,
    work: Arc<Notify>,
    changed: Arc<Notify>,
    retry_backoff_ms: i64,
    lease_clock: LeaseClock,
    lease_epoch: crate::clock::LeaseEpoch,
    writer: crate::group_commit::Writer<submit::Written>,
    completions: crate::group_commit::Writer<(), crate::group_commit::Completion>,
    /// Asks for leases waiting for the claim turn (see `lease_where`).
    lease_asks: Arc<std::sync::Mutex<Vec<(jobs::LeaseAsk, jobs::LeaseReply)>>>,
    claim_turn: Arc<tokio::sync::Mutex<()>>,
    /// Held while the queue is in use: the listener stops when the last clone is dropped.
    _alive: Arc<()>,
}

impl std::fmt::Debug for PgQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgQueue")
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

/// How long a waiter sleeps at most when no notification comes.
const NOTIFIED_FALLBACK: Duration = Duration::from_secs(2);

impl PgQueue {
    pub async fn open(
        options: &PgOptions,
        fields: Arc<dyn FieldCipher>,
    ) -> Result<Self, QueueError> {
        Self::open_with_clock(options, Arc::new(SystemClock), fields).await
    }

    pub async fn open_with_clock(
        options: &PgOptions,
        clock: Arc<dyn Clock>,
        fields: Arc<dyn FieldCipher>,
    ) -> Result<Self, QueueError> {
        let connector = Connector::new(options)?;
        let pool = Pool::builder(Manager(connector.clone()))
            .max_size(options.max_connections.max(2))
            .wait_timeout(Some(options.acquire_timeout))
            .create_timeout(Some(options.connect_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| QueueError::Config(format!("database pool: {e}")))?;
        {
            let mut client = get(&pool).await?;
            migrate::run(&mut client, options.migrate).await?;
        }
        let work = Arc::new(Notify::new());
        let changed = Arc::new(Notify::new());
        let alive = Arc::new(());
        tokio::spawn(listen(
            connector.clone(),
            work.clone(),
            changed.clone(),
            Arc::downgrade(&alive),
        ));
        let writer =
            crate::group_commit::Writer::<submit::Written>::start(pool.clone(), fields.clone());
        let queue = PgQueue {
            completions: crate::group_commit::Writer::<(), _>::start(pool.clone()),
            lease_asks: Default::default(),
            claim_turn: Default::default(),
            pool,
            clock,
            fields,
            connector,
            work,
            changed,
            retry_backoff_ms: i64::try_from(options.retry_backoff.as_millis()).unwrap_or(i64::MAX),
            lease_clock: options.lease_clock,
            lease_epoch: Default::default(),
            writer,
            _alive: alive,
        };
        queue.tag_legacy_keys().await?;
        Ok(queue)
    }

    /// Applies pending migrations (as a role that may change the schema) without opening a
    /// queue; the migration the schema was at and the one it is at now.
    /// With `grant_to`, that role may then read and write the rows (and do nothing else).
    pub async fn migrate(
        options: &PgOptions,
        grant_to: Option<&str>,
    ) -> Result<(i64, i64), QueueError> {
        let mut client = Connector::new(options)?.connect().await?;
        let before = migrate::applied(&client).await?;
        migrate::run(&mut client, true).await?;
        if let Some(role) = grant_to {
            migrate::grant_rows(&client, role).await?;
        }
        Ok((before, migrate::applied(&client).await?))
    }

    /// Who `options` connect as, what the role may do, and the server's version: for
    /// audits. One connection, no queue opened.
    pub async fn describe(options: &PgOptions) -> Result<Connection, QueueError> {
        let client = Connector::new(options)?.connect().await?;
        let row = client
            .query_one(
                "SELECT current_user::TEXT, r.rolsuper, r.rolcreaterole, r.rolcreatedb,
                    (SELECT tableowner::TEXT FROM pg_tables
                     WHERE tablename = 'jobs' AND schemaname = current_schema()) AS owner,
                    has_schema_privilege(current_schema(), 'CREATE') AS may_create,
                    current_setting('server_version') AS version,
                    COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), FALSE)
                        AS ssl
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await?;
        let role: String = row.try_get(0)?;
        let owner: Option<String> = row.try_get("owner")?;
        Ok(Connection {
            owns_tables: owner.as_deref() == Some(role.as_str()),
            role,
            superuser: row.try_get(1)?,
            may_create_roles: row.try_get(2)?,
            may_create_databases: row.try_get(3)?,
            may_change_schema: row.try_get("may_create")?,
            server_version: row.try_get("version")?,
            tls: row.try_get("ssl")?,
        })
    }

    /// Checks a server that takes writes answers (for readiness probes).
    pub async fn ping(&self) -> Result<(), QueueError> {
        let client = self.client().await?;
        // A standby answers too, but refuses writes: only a primary is ready.
        let read_only: String = client
            .query_one("SELECT current_setting('transaction_read_only')", &[])
            .await?
            .try_get(0)?;
        if read_only == "on" {
            return Err(QueueError::Unavailable(
                "the database server is a read-only standby".into(),
            ));
        }
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close();
    }

    /// Whether connections use TLS.
    pub fn tls(&self) -> bool {
        self.connector.tls()
    }

    pub(crate) async fn client(&self) -> Result<deadpool::managed::Object<Manager>, QueueError> {
        get(&self.pool).await
    }

    pub(crate) fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Now on the lease clock, or `None` to read the database's clock in the statement.
    pub(crate) async fn lease_now(&self) -> Result<Option<i64>, QueueError> {
        if self.lease_clock == LeaseClock::Database {
            return Ok(None);
        }
        let now = self
            .lease_epoch
            .now(&*self.clock, |boot| async move {
                self.lease_offset(&boot).await
            })
            .await?;
        Ok(Some(now))
    }

    /// The offset of boot `boot` on the local lease clock, recorded by the first to ask.
    async fn lease_offset(&self, boot: &str) -> Result<i64, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "WITH fresh AS (
                    SELECT GREATEST(
                        (SELECT COALESCE(MAX(lease_until), 0) FROM jobs WHERE status = 'running'),
                        (SELECT COALESCE(MAX(offset_ms), 0) FROM lease_epochs)) + 1 AS offset_ms),
                 inserted AS (
                    INSERT INTO lease_epochs (boot_id, offset_ms) SELECT $1, offset_ms FROM fresh
                    ON CONFLICT (boot_id) DO NOTHING RETURNING offset_ms)
                 SELECT offset_ms FROM inserted
                 UNION ALL SELECT offset_ms FROM lease_epochs WHERE boot_id = $1
                 LIMIT 1",
                &[&boot],
            )
            .await?;
        Ok(row.try_get(0)?)
    }
}

async fn get(pool: &Pool) -> Result<deadpool::managed::Object<Manager>, QueueError> {
    use deadpool::managed::PoolError;
    pool.get().await.map_err(|e| match e {
        PoolError::Backend(e) => e,
        PoolError::Timeout(_) => {
            QueueError::Unavailable("no database connection became free in time".into())
        }
        other => QueueError::Unavailable(other.to_string()),
    })
}

/// Keeps one connection listening for the queue's notifications, reconnecting with backoff,
/// until the queue is dropped. Every (re)connection wakes all waiters: notifications sent
/// while it was away are lost.
async fn listen(connector: Connector, work: Arc<Notify>, changed: Arc<Notify>, alive: Weak<()>) {
    let mut backoff = Duration::from_millis(250);
    while alive.strong_count() > 0 {
        let (to_work, to_changed) = (work.clone(), changed.clone());
        let connected = connector
            .connect_with(move |message| {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    match n.channel() {
                        "sparkle_work" => to_work.notify_waiters(),
                        "sparkle_changes" => to_changed.notify_waiters(),
                        _ => {}
                    }
                }
            })
            .await;
        match connected {
            Ok((client, task)) => {
                match client
                    .batch_execute("LISTEN sparkle_work; LISTEN sparkle_changes")
                    .await
                {
                    Ok(()) => {
                        backoff = Duration::from_millis(250);
                        work.notify_waiters();
                        changed.notify_waiters();
                        // Until the connection ends or the queue is dropped.
                        let mut task = task;
                        loop {
                            tokio::select! {
                                _ = &mut task => break,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                                    if alive.strong_count() == 0 {
                                        task.abort();
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for queue notifications");
                        task.abort();
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to listen for queue notifications")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
pub(crate) mod tests;
