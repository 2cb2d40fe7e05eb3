//! Certificates for the public listener. The dev profile makes a self-signed certificate
//! for the loopback names once and reuses it; otherwise certificate and key come from files.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The protocol versions the listener speaks, preferred first: TLS 1.3, then 1.2. Nothing
/// older is ever negotiated.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

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

/// What a certificate file says about itself: enough to judge it, nothing secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The subject, as `CN=…, O=…`.
    pub subject: String,
    /// The DNS names and IP addresses it is valid for.
    pub names: Vec<String>,
    /// Whether it signed itself (issuer = subject).
    pub self_signed: bool,
    /// Validity, in Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads the first (end-entity) certificate of a PEM chain.
pub fn describe(cert: &Path) -> Result<CertificateInfo, String> {
    let pem = std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| format!("{} holds no PEM certificate", cert.display()))?
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("{} is not a valid certificate: {e}", cert.display()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push(dns.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(octets) => {
                    if let Some(ip) = ip_from_octets(octets) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let validity = parsed.validity();
    Ok(CertificateInfo {
        subject: parsed.subject().to_string(),
        names,
        self_signed: parsed.subject().as_raw() == parsed.issuer().as_raw(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

fn ip_from_octets(octets: &[u8]) -> Option<std::net::IpAddr> {
    match octets.len() {
        4 => <[u8; 4]>::try_from(octets).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(octets)
            .ok()
            .map(std::net::IpAddr::from),
        _ => None,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Reads a PEM certificate chain and its private key, and checks that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain_pem =
        std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let key_pem = zeroize::Zeroizing::new(
        std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?,
    );
    // The parser's error could quote the file; say only which file it was.
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| format!("{} holds no PEM private key", key.display()))?;
    CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| {
        format!(
            "the key {} does not go with the certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })
}
