pub mod audit;
pub mod bench;
pub mod discord;
pub mod generate;
pub mod key;
pub mod keys;
pub mod model;
pub mod serve;

use crate::config::{Config, Overrides};
use crate::{Common, Serve};
use anyhow::Context;
use sparkle_core::{Catalog, ModelEntry};
use sparkle_queue::{SqliteOptions, SqliteQueue};
use sparkle_store::seal::Keys;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The configuration for a command, with its flags applied.
pub fn load_config(common: &Common, serve: Option<&Serve>) -> anyhow::Result<Config> {
    let flags = Overrides {
        data_dir: common.data_dir.clone(),
        listen: serve.and_then(|s| s.listen),
        admin_listen: serve.and_then(|s| s.admin_listen),
        model: serve.and_then(|s| s.model.clone()),
        profile: None,
    };
    Config::load(common.config.as_deref(), &flags)
}

/// The configuration for `sparkle audit`: read, but not refused for what the audit reports.
pub fn load_config_unchecked(common: &Common) -> anyhow::Result<Config> {
    Config::read(
        common.config.as_deref(),
        &Overrides {
            data_dir: common.data_dir.clone(),
            ..Overrides::default()
        },
    )
}

/// Opens the queue and metadata database in the data directory, its sensitive fields
/// sealed under the configured keyring.
pub async fn open_queue(config: &Config) -> anyhow::Result<Arc<SqliteQueue>> {
    open_queue_with(config, crate::keyring::open(config)?).await
}

/// Opens the queue with the keyring the caller already holds.
pub async fn open_queue_with(config: &Config, keys: Arc<Keys>) -> anyhow::Result<Arc<SqliteQueue>> {
    config.prepare_data_dir()?;
    let path = config.database_path();
    let fields = Arc::new(crate::keyring::SealedFields(keys));
    let options = SqliteOptions {
        retry_backoff: Duration::from_secs(config.queue.retry_backoff_secs),
        ..SqliteOptions::default()
    };
    let queue = SqliteQueue::open(&path, &options, fields)
        .await
        .with_context(|| format!("cannot open the database {}", path.display()))?;
    Ok(Arc::new(queue))
}

/// Opens an existing database to read it: no migration, no sealing of older rows, nothing
/// created.
pub async fn open_queue_read_only(
    config: &Config,
    keys: Arc<Keys>,
) -> anyhow::Result<Arc<SqliteQueue>> {
    let path = config.database_path();
    let fields = Arc::new(crate::keyring::SealedFields(keys));
    let options = SqliteOptions {
        migrate: false,
        max_connections: 1,
        ..SqliteOptions::default()
    };
    let queue = SqliteQueue::open(&path, &options, fields)
        .await
        .with_context(|| format!("cannot open the database {}", path.display()))?;
    Ok(Arc::new(queue))
}

/// The catalog of models served: the configured model, named after its directory.
pub fn catalog(model_dir: &Path) -> anyhow::Result<Catalog> {
    let description = sparkle_engine::describe(model_dir)
        .with_context(|| format!("cannot read the model at {}", model_dir.display()))?;
    let defaults = description.defaults;
    let entry = ModelEntry {
        default_steps: defaults.steps,
        default_guidance_scale: defaults.guidance_scale,
        default_scheduler: defaults.scheduler,
        ..ModelEntry::new(description.name, description.native_size)
    };
    Ok(Catalog {
        models: vec![entry],
    })
}
