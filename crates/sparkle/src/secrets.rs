//! Secrets from files: the only way a secret enters Sparkle's configuration. A file that its
//! group or others can read is refused, so a secret never sits where other users see it.

use anyhow::{bail, Context};
use std::path::Path;
use zeroize::Zeroizing;

/// Refuses a secret file that its group or others can read.
pub fn check_private(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("cannot read the secret file {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by group or others (mode {:o}); run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
    Ok(())
}

/// Reads a secret file (trimmed), refusing files readable by group or others.
pub fn read_secret_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    check_private(path)?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the secret file {}", path.display()))?,
    );
    let secret = Zeroizing::new(text.trim().to_string());
    if secret.is_empty() {
        bail!("the secret file {} is empty", path.display());
    }
    Ok(secret)
}

/// Replaces (or creates) a secret file with `contents`, owner-only (0600): written to a new
/// file beside it, synced, then renamed over it, so a crash leaves the old file or the new
/// one, never half of either.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.new", std::process::id()));
    let temp = dir.join(temp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&temp).and_then(|mut file| {
        std::io::Write::write_all(&mut file, contents)?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&temp, path)) {
        let _ = std::fs::remove_file(&temp);
        return Err(e).with_context(|| format!("cannot write the secret file {}", path.display()));
    }
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// A random key of `len` bytes kept hex-encoded in `path`: read when the file exists (with
/// the same mode checks as every secret), otherwise made and written with mode 0600, so a
/// deployment keeps its key across restarts without anyone handling it.
pub fn load_or_create_key(path: &Path, len: usize) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if path.exists() {
        let text = read_secret_file(path)?;
        let key = Zeroizing::new(
            hex::decode(text.as_str())
                .with_context(|| format!("{} does not hold a hex key", path.display()))?,
        );
        if key.len() < len {
            bail!(
                "{} holds a {}-byte key; at least {len} bytes are needed",
                path.display(),
                key.len()
            );
        }
        return Ok(key);
    }
    let mut key = Zeroizing::new(vec![0u8; len]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    let text = Zeroizing::new(hex::encode(&*key));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create the key file {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write the key file {}", path.display()))?;
    tracing::info!(file = %path.display(), "created a new key file");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_created_once_private_and_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        let first = load_or_create_key(&path, 32).expect("create");
        assert_eq!(first.len(), 32);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(*load_or_create_key(&path, 32).expect("reuse"), *first);
        assert!(load_or_create_key(&path, 64).is_err(), "too short for 64");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(load_or_create_key(&path, 32).is_err(), "group-readable");
    }

    #[test]
    fn secret_files_are_replaced_whole_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ring");
        write_secret_file(&path, b"one").expect("create");
        write_secret_file(&path, b"two").expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no leftovers"
        );
    }

    #[test]
    fn world_readable_and_empty_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_secret_file(&path).expect_err("world-readable");
        assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
        assert!(!format!("{err:#}").contains("s3cret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_secret_file(&path).expect("read").as_str(), "s3cret");
        std::fs::write(&path, "  \n").expect("write");
        assert!(read_secret_file(&path).is_err());
    }
}
