//! `sparkle keyring`: the master keys that seal images and database fields at rest.

use super::{load_config, open_queue_with};
use crate::config::Config;
use crate::keyring::{self, ChangeLock};
use crate::Common;
use anyhow::{bail, Context};
use clap::Subcommand;
use sparkle_seal::{Keyring, MasterKeyId, MasterKeys};
use sparkle_store::ObjectImageStore;
use std::sync::Arc;

#[derive(Debug, Subcommand)]
pub enum KeyringCommand {
    /// Show the master keys: id, creation time (UTC), and whether each is active (sealing
    /// new images and fields), live (still opening what it sealed) or retired. Never the
    /// key material.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Add a new master key, make it the active one, and re-wrap every stored image's data
    /// key with it (only each image's small header is rewritten; the encrypted image is
    /// not) and re-seal the database's sealed fields under it. Older keys keep opening
    /// anything not yet re-wrapped until they are retired. Running services pick the new
    /// key up within seconds. Without a keyring, makes one.
    #[command(
        after_help = "The keyring is `keyring` in the data directory unless encryption.keyring_file \
names another file. Back it up after every change: without it nothing sealed can be read. \
Run this again if it was interrupted; `sparkle keyring retire` then removes the keys no longer needed."
    )]
    Rotate {
        #[command(flatten)]
        common: Common,
    },
    /// Retire a master key for good: its material is erased from the keyring. Refused for
    /// the active key and while any image or database field still uses the key (rotate
    /// first).
    Retire {
        #[command(flatten)]
        common: Common,
        /// The key id, as `sparkle keyring list` shows it.
        id: String,
    },
}

pub async fn run(command: KeyringCommand) -> anyhow::Result<()> {
    match command {
        KeyringCommand::List { common } => list(&load_config(&common, None)?),
        KeyringCommand::Rotate { common } => rotate(&load_config(&common, None)?).await,
        KeyringCommand::Retire { common, id } => retire(&load_config(&common, None)?, &id).await,
    }
}

fn list(config: &Config) -> anyhow::Result<()> {
    let path = keyring::path(config);
    if !path.exists() {
        bail!(
            "no keyring at {}; services make one on first start, or run `sparkle keyring rotate`",
            path.display()
        );
    }
    let ring = keyring::read(&path)?;
    for key in ring.keys() {
        let state = match key.retired_at {
            Some(when) => format!("retired {}", utc(when)),
            None if &key.id == ring.active_id() => "active".into(),
            None => "live".into(),
        };
        println!("{}\t{}\t{state}", key.id, utc(key.created_at));
    }
    Ok(())
}

/// What stores sealed data, opened with `ring`.
fn images(config: &Config, ring: Keyring) -> anyhow::Result<ObjectImageStore> {
    super::open_store(config, Arc::new(MasterKeys::fixed(ring)))
}

/// The metadata database, its fields opened with `ring`.
async fn database(
    config: &Config,
    ring: Keyring,
) -> anyhow::Result<Arc<dyn sparkle_queue::Database>> {
    open_queue_with(config, Arc::new(MasterKeys::fixed(ring))).await
}

async fn rotate(config: &Config) -> anyhow::Result<()> {
    let path = keyring::path(config);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _lock = ChangeLock::take(&path)?;
    let ring = if path.exists() {
        let mut ring = keyring::read(&path)?;
        let id = ring.rotate(keyring::now());
        // The key is written down before anything is sealed with it.
        keyring::write(&path, &ring)?;
        eprintln!("Added master key {id}; it is now the active key.");
        ring
    } else {
        let ring = Keyring::generate(keyring::now());
        keyring::write(&path, &ring)?;
        eprintln!(
            "Created the keyring {} with master key {}.",
            path.display(),
            ring.active_id()
        );
        ring
    };
    config.prepare_data_dir()?;
    let done = images(config, ring.clone())?
        .rewrap_all()
        .await
        .context("re-wrapping images (run `sparkle keyring rotate` again to finish)")?;
    eprintln!(
        "Images: {} re-wrapped, {} already current, {} sealed for the first time.",
        done.rewrapped, done.current, done.sealed
    );
    if config.database_exists() {
        let rows = database(config, ring)
            .await?
            .reseal_fields()
            .await
            .context("re-sealing database fields (run `sparkle keyring rotate` again to finish)")?;
        eprintln!("Database: {rows} row(s) re-sealed.");
    }
    eprintln!("Back up {} now.", path.display());
    Ok(())
}

async fn retire(config: &Config, id: &str) -> anyhow::Result<()> {
    let id = MasterKeyId::new(id)?;
    let path = keyring::path(config);
    let _lock = ChangeLock::take(&path)?;
    let mut ring = keyring::read(&path)?;
    match ring.keys().iter().find(|k| k.id == id) {
        None => bail!("no key {id} in {}", path.display()),
        Some(k) if k.retired_at.is_some() => bail!("{id} is already retired"),
        Some(_) if &id == ring.active_id() => {
            bail!("{id} is the active key; run `sparkle keyring rotate` first")
        }
        Some(_) => {}
    }
    let usage = images(config, ring.clone())?.key_usage().await?;
    let in_use = usage.by_key.get(&id).copied().unwrap_or(0);
    if in_use > 0 {
        bail!(
            "{in_use} stored image(s) still use {id}; run `sparkle keyring rotate` to re-wrap them, then retire it"
        );
    }
    if config.database_exists() {
        let usage = database(config, ring.clone())
            .await?
            .field_key_usage()
            .await?;
        let in_use = usage.by_key.get(id.as_str()).copied().unwrap_or(0);
        if in_use > 0 {
            bail!(
                "{in_use} database field(s) still use {id}; run `sparkle keyring rotate` to re-seal them, then retire it"
            );
        }
    }
    ring.retire(&id, keyring::now())?;
    keyring::write(&path, &ring)?;
    eprintln!("Retired {id}: its material is erased from the keyring.");
    Ok(())
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (the seconds themselves if out of range).
pub(crate) fn utc(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{secs} s after 1970-01-01 UTC"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png() -> Vec<u8> {
        b"\x89PNG\r\n\x1a\nrest".to_vec()
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_735_689_599), "2024-12-31 23:59:59 UTC");
    }

    #[tokio::test]
    async fn a_key_still_in_use_is_not_retired() {
        use sparkle_store::{ImageKey, ImageStore};
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let first = keyring::load(&config).expect("keyring");
        let old = first.active_id().clone();
        let image = ImageKey {
            job: sparkle_core::JobId::random(),
            index: 0,
        };
        images(&config, first.clone())
            .expect("store")
            .put(image, Some(1), png().into())
            .await
            .expect("put");
        let job = {
            let queue = database(&config, first).await.expect("database");
            let new = sparkle_queue::conformance::new_job("discord:42", "a corgi");
            queue.enqueue(new).await.expect("enqueue").job.id
        };
        // A rotation that has not re-wrapped yet, as when one was interrupted.
        let mut ring = keyring::read(&keyring::path(&config)).expect("read");
        ring.rotate(keyring::now());
        keyring::write(&keyring::path(&config), &ring).expect("write");
        let err = retire(&config, old.as_str()).await.expect_err("in use");
        assert!(format!("{err:#}").contains("stored image"), "{err:#}");
        let active = ring.active_id().clone();
        let err = retire(&config, active.as_str()).await.expect_err("active");
        assert!(format!("{err:#}").contains("active key"), "{err:#}");
        images(&config, ring.clone())
            .expect("store")
            .rewrap_all()
            .await
            .expect("rewrap");
        let err = retire(&config, old.as_str()).await.expect_err("in use");
        assert!(format!("{err:#}").contains("database field"), "{err:#}");

        rotate(&config).await.expect("rotate");
        retire(&config, old.as_str()).await.expect("retire");
        let ring = keyring::read(&keyring::path(&config)).expect("read");
        assert!(ring.keys()[0].material().is_none());
        let got = images(&config, ring)
            .expect("store")
            .get(image, Some(1))
            .await
            .expect("opens under the new key")
            .expect("present");
        assert_eq!(got.as_ref(), png().as_slice());
        let ring = keyring::read(&keyring::path(&config)).expect("read");
        let queue = database(&config, ring).await.expect("database");
        let job = sparkle_queue::JobQueue::get(&*queue, job)
            .await
            .expect("opens under the new key")
            .expect("present");
        assert_eq!(job.request.prompt, "a corgi");
        assert!(retire(&config, old.as_str()).await.is_err(), "retired once");
    }
}
