//! Migrations embedded in the binary, applied in order at start under an advisory lock (so
//! processes starting at once apply each one once), each in a transaction of its own.

use crate::QueueError;
use tokio_postgres::Client;

/// Every migration, in order: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../migrations/postgres/0001_schema.sql"),
    ),
    (
        2,
        "api key tags",
        include_str!("../../migrations/postgres/0002_api_key_tags.sql"),
    ),
    (
        3,
        "models",
        include_str!("../../migrations/postgres/0003_models.sql"),
    ),
    (
        4,
        "sessions",
        include_str!("../../migrations/postgres/0004_sessions.sql"),
    ),
];

/// The advisory lock migrations are applied under.
const MIGRATION_LOCK: i64 = 0x5350_4b4c_0000_0001;

/// The newest migration this binary knows.
pub fn latest() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// The newest migration applied to the database, 0 when none is.
pub async fn applied(client: &Client) -> Result<i64, QueueError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('sparkle_migrations') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM sparkle_migrations",
            &[],
        )
        .await?
        .try_get(0)?)
}

/// Brings the schema up to date when `apply`; otherwise checks that it is.
pub async fn run(client: &mut Client, apply: bool) -> Result<(), QueueError> {
    let current = applied(client).await?;
    if current > latest() {
        return Err(QueueError::Config(format!(
            "the database schema is at migration {current}, newer than this binary knows ({}): \
             run the newer binary",
            latest()
        )));
    }
    if current == latest() {
        return Ok(());
    }
    if !apply {
        return Err(QueueError::Config(format!(
            "the database schema is at migration {current} of {}: run `sparkle migrate` as the \
             database's owner",
            latest()
        )));
    }
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let outcome = apply_pending(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    outcome?;
    unlocked?;
    Ok(())
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Lets `role` read and write the rows of every table of the queue's schema, and nothing
/// more: the role the service connects as.
pub async fn grant_rows(client: &Client, role: &str) -> Result<(), QueueError> {
    let role = quote_ident(role);
    client
        .batch_execute(&format!(
            "DO $$ BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO {role}', current_schema()); END $$;
             DO $$ BEGIN EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO {role}', current_schema()); END $$;
             DO $$ BEGIN EXECUTE format('GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %I TO {role}', current_schema()); END $$;
             REVOKE ALL ON sparkle_migrations FROM {role};
             GRANT SELECT ON sparkle_migrations TO {role};"
        ))
        .await?;
    Ok(())
}

async fn apply_pending(client: &mut Client) -> Result<(), QueueError> {
    let refused = |e: tokio_postgres::Error| {
        if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            let why = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default();
            QueueError::Config(format!(
                "this role may not change the schema ({why}): run `sparkle migrate \
                 --database-url ...` as the database's owner"
            ))
        } else {
            e.into()
        }
    };
    // A schema the connection names (`search_path`) that does not exist yet is made here.
    let schema: Option<String> = client
        .query_one("SELECT current_schema()::TEXT", &[])
        .await?
        .try_get(0)?;
    if schema.is_none() {
        let path: String = client
            .query_one("SELECT current_setting('search_path')", &[])
            .await?
            .try_get(0)?;
        let first = path
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        if first.is_empty() || first == "$user" {
            return Err(QueueError::Config(
                "the connection's search_path names no schema to create the tables in".into(),
            ));
        }
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(first)
            ))
            .await
            .map_err(refused)?;
    }
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sparkle_migrations (
                version    BIGINT      PRIMARY KEY,
                name       TEXT        NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(refused)?;
    // Read again under the lock: another process may have applied some meanwhile.
    let current = applied(client).await?;
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await.map_err(refused)?;
        tx.execute(
            "INSERT INTO sparkle_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied a database migration");
    }
    Ok(())
}
