pub mod audit;
pub mod bench;
pub mod discord;
pub mod enrollment;
pub mod generate;
pub mod key;
pub mod keyring;
pub mod migrate;
pub mod model;
pub mod serve;
pub mod simulate;

use crate::config::{Config, Overrides};
use crate::{Common, Serve};
use anyhow::Context;
use sparkle_core::{Catalog, ModelEntry};
use sparkle_queue::{Database, PgOptions, PgQueue, SqliteOptions, SqliteQueue};
use sparkle_seal::MasterKeys;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The configuration for a command, with its flags applied.
pub fn load_config(common: &Common, serve: Option<&Serve>) -> anyhow::Result<Config> {
    let flags = Overrides {
        data_dir: common.data_dir.clone(),
        listen: serve.and_then(|s| s.listen),
        admin_listen: serve.and_then(|s| s.admin_listen),
        model: serve.and_then(|s| s.model.first().cloned()),
        models: serve
            .filter(|s| s.model.len() > 1)
            .map(|s| s.model[1..].to_vec()),
        scaler: serve
            .and_then(|s| s.gpus.clone())
            .map(|gpus| crate::config::ScalerFlags { gpus }),
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

/// Opens the queue and metadata database (SQLite in the data directory, or the PostgreSQL
/// server `database.url` names), its sensitive fields sealed under the configured keyring.
pub async fn open_queue(config: &Config) -> anyhow::Result<Arc<dyn Database>> {
    open_queue_with(config, crate::keyring::open(config)?).await
}

/// Opens the queue with the keyring the caller already holds, applying migrations.
pub async fn open_queue_with(
    config: &Config,
    keys: Arc<MasterKeys>,
) -> anyhow::Result<Arc<dyn Database>> {
    open_database(config, keys, true).await
}

/// Opens an existing database to read it: no migration, no sealing of older rows, nothing
/// created.
pub async fn open_queue_read_only(
    config: &Config,
    keys: Arc<MasterKeys>,
) -> anyhow::Result<Arc<dyn Database>> {
    open_database(config, keys, false).await
}

/// The PostgreSQL options the configuration gives, `None` for the embedded database.
pub fn postgres_options(config: &Config, migrate: bool) -> Option<PgOptions> {
    let url = config.database.url.clone()?;
    let defaults = PgOptions::new(url);
    Some(PgOptions {
        ca_file: config.database.ca_file.clone(),
        password_file: config.database.password_file.clone(),
        migrate,
        max_connections: config
            .database
            .max_connections
            .unwrap_or(defaults.max_connections),
        retry_backoff: Duration::from_secs(config.queue.retry_backoff_secs),
        ..defaults
    })
}

async fn open_database(
    config: &Config,
    keys: Arc<MasterKeys>,
    migrate: bool,
) -> anyhow::Result<Arc<dyn Database>> {
    let fields = Arc::new(crate::keyring::SealedFields(keys));
    if let Some(options) = postgres_options(config, migrate) {
        let queue = PgQueue::open(&options, fields)
            .await
            .with_context(|| format!("cannot open the database {options:?}"))?;
        return Ok(Arc::new(queue));
    }
    let path = config.database_path();
    let options = if migrate {
        config.prepare_data_dir()?;
        SqliteOptions {
            retry_backoff: Duration::from_secs(config.queue.retry_backoff_secs),
            ..SqliteOptions::default()
        }
    } else {
        SqliteOptions {
            migrate: false,
            max_connections: 1,
            ..SqliteOptions::default()
        }
    };
    let queue = SqliteQueue::open(&path, &options, fields)
        .await
        .with_context(|| format!("cannot open the database {}", path.display()))?;
    Ok(Arc::new(queue))
}

/// The catalog of models served, the default first: each model named after its directory
/// (or its checkpoint's file name). Two models of one name are refused.
pub fn catalog(paths: &[std::path::PathBuf]) -> anyhow::Result<Catalog> {
    let mut models: Vec<(ModelEntry, &Path)> = Vec::with_capacity(paths.len());
    for path in paths {
        let description = sparkle_engine::describe(path)
            .with_context(|| format!("cannot read the model at {}", path.display()))?;
        if !sparkle_core::is_model_name(&description.name) {
            anyhow::bail!(
                "the model at {} is named {:?}; a model's name (its directory's or file's) \
                 has no `|` or control characters",
                path.display(),
                description.name
            );
        }
        if let Some((_, other)) = models.iter().find(|(m, _)| m.name == description.name) {
            anyhow::bail!(
                "two models are named {:?}: {} and {}; rename one's directory",
                description.name,
                other.display(),
                path.display()
            );
        }
        let defaults = description.defaults;
        let beside = sparkle_engine::Additions::of(path).with_context(|| {
            format!(
                "cannot read the embeddings and LoRAs beside {}",
                path.display()
            )
        })?;
        for (name, why) in beside
            .loras
            .skipped
            .iter()
            .chain(&beside.embeddings.skipped)
        {
            tracing::warn!(model = %description.name, name = %name, reason = %why, "left out beside the model");
        }
        let entry = ModelEntry {
            default_steps: defaults.steps,
            default_guidance_scale: defaults.guidance_scale,
            default_scheduler: defaults.scheduler,
            loras: beside.loras.names,
            other_loras: beside
                .loras
                .skipped
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
            embeddings: beside.embeddings.names,
            ..ModelEntry::new(description.name, description.native_size)
        };
        models.push((entry, path));
    }
    Ok(Catalog {
        models: models.into_iter().map(|(entry, _)| entry).collect(),
    })
}

/// The image store the configuration names: S3-compatible by `store.url`, else the local
/// directory.
pub fn open_store(
    config: &Config,
    keys: Arc<MasterKeys>,
) -> anyhow::Result<sparkle_store::ObjectImageStore> {
    let s = &config.store;
    let Some(url) = &s.url else {
        return Ok(sparkle_store::ObjectImageStore::local(
            &config.images_dir(),
            keys,
        )?);
    };
    let credentials = match &s.credentials_file {
        Some(path) => Some(read_credentials(path)?),
        None => None,
    };
    let options = sparkle_store::S3Options {
        url: url.clone(),
        endpoint: s.endpoint.clone(),
        region: s.region.clone(),
        ca_file: s.ca_file.clone(),
        credentials,
    };
    Ok(sparkle_store::ObjectImageStore::s3(&options, keys)?)
}

/// The access key of an AWS shared-credentials file (its first profile).
fn read_credentials(path: &Path) -> anyhow::Result<(String, zeroize::Zeroizing<String>)> {
    let text = crate::secrets::read_secret_file(path)
        .with_context(|| format!("store.credentials_file {}", path.display()))?;
    let value = |name: &str| {
        text.lines()
            .filter_map(|line| line.split_once('='))
            .find(|(key, _)| key.trim() == name)
            .map(|(_, value)| value.trim().to_string())
    };
    match (value("aws_access_key_id"), value("aws_secret_access_key")) {
        (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
            Ok((id, zeroize::Zeroizing::new(secret)))
        }
        _ => anyhow::bail!(
            "store.credentials_file {} must hold aws_access_key_id and aws_secret_access_key",
            path.display()
        ),
    }
}
