//! Certificates for the public listener. The dev profile makes a self-signed certificate
//! for the loopback names once and reuses it; otherwise certificate and key come from files.

use std::io;
use std::path::{Path, PathBuf};

/// Where a self-signed certificate and its key are kept in the data directory.
pub fn self_signed_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Makes (once) a self-signed certificate for `localhost`, `127.0.0.1`, `::1` and the
/// extra names given; returns the certificate and key paths. The key file is owner-only.
pub fn ensure_self_signed(
    data_dir: &Path,
    extra_names: &[String],
) -> io::Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = self_signed_paths(data_dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(extra_names.iter().cloned());
    let certified = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, certified.cert.pem())?;
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// The rustls configuration for the listener: TLS 1.3 and 1.2 only.
pub async fn load(cert: &Path, key: &Path) -> io::Result<axum_server::tls_rustls::RustlsConfig> {
    axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await
}
