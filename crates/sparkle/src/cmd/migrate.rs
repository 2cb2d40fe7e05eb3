//! `sparkle migrate`: brings the database schema up to date, as a role that may change it.
//!
//! The service connects as a role that may only read and write rows, so on PostgreSQL the
//! schema is changed by the database's owner, once per upgrade, before the new version
//! starts. Several processes migrating at once are safe (an advisory lock).

use super::{load_config_unchecked, postgres_options};
use crate::Common;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    common: Common,
    /// Connect with this connection string instead of `database.url` (the owner's role).
    #[arg(long, value_name = "URL", env = "SPARKLE_MIGRATE_DATABASE_URL")]
    database_url: Option<String>,
    /// The owner's password file, instead of `database.password_file`.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Then let this role (the one the service connects as) read and write the queue's
    /// rows, and nothing more.
    #[arg(long, value_name = "ROLE")]
    grant_to: Option<String>,
}

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let mut config = load_config_unchecked(&args.common)?;
    if let Some(url) = args.database_url {
        config.database.url = Some(url);
    }
    if let Some(file) = args.password_file {
        config.database.password_file = Some(file);
    }
    config.check()?;
    let Some(options) = postgres_options(&config, true) else {
        // The embedded database: opening it applies what is pending.
        super::open_queue(&config).await?;
        println!("{}: up to date", config.database_path().display());
        return Ok(());
    };
    let (before, after) = sparkle_queue::PgQueue::migrate(&options, args.grant_to.as_deref())
        .await
        .with_context(|| format!("cannot migrate {options:?}"))?;
    if before == after {
        println!("the database schema is up to date (migration {after})");
    } else {
        println!("the database schema went from migration {before} to {after}");
    }
    if let Some(role) = &args.grant_to {
        println!("{role} may read and write the queue's rows");
    }
    Ok(())
}
