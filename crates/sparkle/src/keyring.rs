//! The keyring file: the master keys that seal images and database fields at rest.
//!
//! It lives in the data directory as `keyring` (made owner-only on the first start of the
//! dev profile) or wherever `encryption.keyring_file` says (then it must exist, made with
//! `sparkle keyring rotate`). Like every secret file it is refused when group or others can read
//! it. Its text is [`sparkle_seal::text`]'s; this module knows where the file is, who may
//! read it, when it is made, and follows it when another process changes it.

use crate::config::{Config, Profile};
use crate::secrets::{check_private, write_secret_file};
use anyhow::{bail, Context};
use sparkle_queue::{Field, FieldCipher, FieldError};
use sparkle_seal::{field, KeySource, Keyring, MasterKeys, SealError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use zeroize::Zeroizing;

/// The keyring's name in the data directory.
pub const FILE_NAME: &str = "keyring";

/// Where this configuration keeps its keyring.
pub fn path(config: &Config) -> PathBuf {
    config
        .encryption
        .keyring_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join(FILE_NAME))
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Reads the keyring file, refusing one that group or others can read.
pub fn read(path: &Path) -> anyhow::Result<Keyring> {
    check_private(path)?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the keyring {}", path.display()))?,
    );
    sparkle_seal::text::parse(&text)
        .map_err(|why| anyhow::anyhow!("the keyring {} is invalid: {why}", path.display()))
}

/// Replaces the keyring file.
pub fn write(path: &Path, ring: &Keyring) -> anyhow::Result<()> {
    write_secret_file(path, sparkle_seal::text::format(ring).as_bytes())
}

/// Writes a new keyring where none is, never over one (two processes starting at once
/// both end up with whichever was written first).
fn create(path: &Path) -> anyhow::Result<Keyring> {
    let ring = Keyring::generate(now());
    let mut temp_name = std::ffi::OsString::from(".keyring-new.");
    temp_name.push(std::process::id().to_string());
    let temp = path.with_file_name(temp_name);
    write_secret_file(&temp, sparkle_seal::text::format(&ring).as_bytes())?;
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => {
            tracing::info!(file = %path.display(), key = %ring.active_id(), "created the keyring");
            Ok(ring)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(e).with_context(|| format!("cannot create the keyring {}", path.display())),
    }
}

/// The keyring for this configuration: read, or made on the first start of the dev profile
/// when it is the data directory's own. A configured keyring file, and any keyring under the
/// production profile, must already exist.
pub fn load(config: &Config) -> anyhow::Result<Keyring> {
    let path = path(config);
    if path.exists() {
        return read(&path);
    }
    if config.encryption.keyring_file.is_some() {
        bail!(
            "the keyring {} does not exist; make one with `sparkle keyring rotate` (same --config)",
            path.display()
        );
    }
    if config.profile == Profile::Production {
        bail!(
            "no keyring at {}: the production profile does not make one on its own; run `sparkle keyring rotate` (same --config) and back the file up",
            path.display()
        );
    }
    config.prepare_data_dir()?;
    create(&path)
}

/// The live keyring a service holds: it follows the file when `sparkle keyring` changes it.
pub fn open(config: &Config) -> anyhow::Result<Arc<MasterKeys>> {
    let ring = load(config)?;
    let path = path(config);
    let source = FileSource {
        stamp: Mutex::new(stamp(&path)),
        path,
    };
    Ok(Arc::new(MasterKeys::watching(ring, Box::new(source))))
}

type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

/// The keyring file, re-read when its inode, size or modification time changes.
struct FileSource {
    path: PathBuf,
    stamp: Mutex<Stamp>,
}

impl KeySource for FileSource {
    fn reload(&self) -> Result<Option<Keyring>, SealError> {
        let now = stamp(&self.path);
        let Ok(mut seen) = self.stamp.lock() else {
            return Ok(None);
        };
        if *seen == now {
            return Ok(None);
        }
        let ring = read(&self.path).map_err(|e| SealError::Keyring(format!("{e:#}")))?;
        *seen = now;
        Ok(Some(ring))
    }
}

/// The queue's sealed fields, under the same keyring as the images.
pub struct SealedFields(pub Arc<MasterKeys>);

impl FieldCipher for SealedFields {
    fn seal(&self, which: Field, row: &str, plain: &[u8]) -> Result<String, FieldError> {
        field::seal(&self.0.current(), which.name(), row, plain)
            .map_err(|e| FieldError(e.to_string()))
    }

    fn open(
        &self,
        which: Field,
        row: &str,
        sealed: &str,
    ) -> Result<Zeroizing<Vec<u8>>, FieldError> {
        field::open(&self.0, which.name(), row, sealed).map_err(|e| FieldError(e.to_string()))
    }

    fn blind(&self, which: Field, value: &[u8]) -> String {
        field::blind(&self.0.current(), which.name(), value)
    }

    fn key_of(&self, sealed: &str) -> Option<String> {
        field::key_id(sealed).ok().map(|id| id.to_string())
    }

    fn active_key(&self) -> String {
        self.0.current().active_id().to_string()
    }
}

/// Held while a command changes the keyring, so two changes never interleave (one would
/// drop the key the other just added).
pub struct ChangeLock(PathBuf);

impl ChangeLock {
    pub fn take(keyring: &Path) -> anyhow::Result<ChangeLock> {
        let mut name = keyring.as_os_str().to_owned();
        name.push(".lock");
        let lock = PathBuf::from(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => Ok(ChangeLock(lock)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "another `sparkle keyring` command is changing the keyring; if none is running, one was interrupted: remove {}",
                lock.display()
            ),
            Err(e) => Err(e).with_context(|| format!("cannot create {}", lock.display())),
        }
    }
}

impl Drop for ChangeLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path) -> Config {
        Config {
            data_dir: dir.join("data"),
            ..Config::default()
        }
    }

    #[test]
    fn the_dev_keyring_is_made_once_private_and_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        let first = load(&config).expect("create");
        let file = path(&config);
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load(&config).expect("reuse");
        assert_eq!(again.active_id(), first.active_id());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = load(&config).expect_err("group-readable");
        assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
    }

    #[test]
    fn configured_and_production_keyrings_are_never_made_on_the_fly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut configured = config(dir.path());
        configured.encryption.keyring_file = Some(dir.path().join("ring"));
        let err = load(&configured).expect_err("missing file");
        assert!(
            format!("{err:#}").contains("sparkle keyring rotate"),
            "{err:#}"
        );
        let production = Config {
            profile: Profile::Production,
            ..config(dir.path())
        };
        assert!(load(&production).is_err());
        assert!(!path(&production).exists());
    }

    #[test]
    fn a_running_service_follows_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        let keys = open(&config).expect("open");
        let before = keys.current().active_id().clone();
        let mut ring = read(&path(&config)).expect("read");
        let after = ring.rotate(now());
        write(&path(&config), &ring).expect("write");
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_ne!(before, after);
        assert_eq!(keys.current().active_id(), &after);
    }

    #[test]
    fn one_change_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keyring");
        let held = ChangeLock::take(&file).expect("lock");
        assert!(ChangeLock::take(&file).is_err());
        drop(held);
        assert!(ChangeLock::take(&file).is_ok());
    }
}
