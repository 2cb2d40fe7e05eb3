//! Secrets from files: the only way a secret enters Sparkle's configuration. A file that its
//! group or others can read is refused, so a secret never sits where other users see it.

use anyhow::{bail, Context};
use std::path::Path;
use zeroize::Zeroizing;

/// Reads a secret file (trimmed), refusing files readable by group or others.
pub fn read_secret_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
