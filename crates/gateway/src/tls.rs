//! TLS for the public listener: rustls only, TLS 1.3 preferred and 1.2 the minimum, HTTP/1.1.
//!
//! Certificate and key come from files and are re-read when the files change: the
//! [`ReloadingCertificate`] resolver looks at their modification times at most once per
//! check interval, during a handshake, and swaps in the new pair only once the two files
//! parse and belong together, so a renewal (certbot, cert-manager, a cron job) takes effect
//! on new connections without a restart, and a half-written renewal is never served. The dev
//! profile makes a self-signed certificate for the names this machine answers to and renews
//! it when it nears its end.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The protocol versions the listener speaks, preferred first: TLS 1.3, then 1.2. Nothing
/// older is ever negotiated.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The application protocol offered in ALPN. HTTP/1.1 only: the header and idle timeouts
/// that keep slow clients from holding connections are HTTP/1's.
pub const ALPN: &[u8] = b"http/1.1";

/// Days a self-signed certificate is made for, and the days left at which it is made anew.
const SELF_SIGNED_DAYS: i64 = 365;
const SELF_SIGNED_RENEW_DAYS: i64 = 30;

/// Where a self-signed certificate and its key are kept in the data directory.
pub fn self_signed_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// The self-signed certificate of the dev profile, for `localhost`, `127.0.0.1`, `::1` and
/// the extra names given (the host name, the listen address): reused while it covers every
/// name and has more than 30 days left, otherwise made anew (valid for a year). Returns the
/// certificate and key paths; the key file is owner-only.
pub fn ensure_self_signed(
    data_dir: &Path,
    extra_names: &[String],
) -> io::Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = self_signed_paths(data_dir);
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for name in extra_names {
        if !name.is_empty() && !names.contains(name) {
            names.push(name.clone());
        }
    }
    let now = time::OffsetDateTime::now_utc();
    if key_path.exists() {
        if let Ok(info) = describe(&cert_path) {
            let days_left = (info.not_after - now.unix_timestamp()) / 86_400;
            let covers = names.iter().all(|n| info.names.contains(n));
            if covers && days_left > SELF_SIGNED_RENEW_DAYS {
                return Ok((cert_path, key_path));
            }
        }
    }
    let mut params = rcgen::CertificateParams::new(names.clone()).map_err(io::Error::other)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Sparkle (dev, self-signed)");
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(SELF_SIGNED_DAYS);
    let key = rcgen::KeyPair::generate().map_err(io::Error::other)?;
    let cert = params.self_signed(&key).map_err(io::Error::other)?;
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem())?;
    tracing::info!(certificate = %cert_path.display(), names = %names.join(", "), "made a self-signed certificate");
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

/// The rustls configuration of the listener: [`PROTOCOL_VERSIONS`], no client
/// certificates, HTTP/1.1 by ALPN, and the certificate from `resolver`.
pub fn server_config(
    resolver: Arc<ReloadingCertificate>,
) -> Result<axum_server::tls_rustls::RustlsConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(axum_server::tls_rustls::RustlsConfig::from_config(
        Arc::new(config),
    ))
}

/// What identifies a version of a file: modification time, size, inode.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

/// A certificate and key read from files, re-read when either file changes.
pub struct ReloadingCertificate {
    cert: PathBuf,
    key: PathBuf,
    check_every: Duration,
    current: Mutex<Current>,
}

struct Current {
    certified: Arc<CertifiedKey>,
    stamps: (Stamp, Stamp),
    checked: Instant,
}

impl std::fmt::Debug for ReloadingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCertificate")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ReloadingCertificate {
    /// Reads the pair now (an error if it does not load), then looks for changes at most
    /// once per `check_every`.
    pub fn new(cert: &Path, key: &Path, check_every: Duration) -> Result<Self, String> {
        let stamps = (stamp(cert), stamp(key));
        let certified = Arc::new(load_pair(cert, key)?);
        Ok(ReloadingCertificate {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            check_every,
            current: Mutex::new(Current {
                certified,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The pair to serve: the one loaded last, re-read first if the files changed since.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.checked.elapsed() < self.check_every {
            return current.certified.clone();
        }
        current.checked = Instant::now();
        let stamps = (stamp(&self.cert), stamp(&self.key));
        if stamps != current.stamps {
            match load_pair(&self.cert, &self.key) {
                Ok(certified) => {
                    current.certified = Arc::new(certified);
                    current.stamps = stamps;
                    tracing::info!(certificate = %self.cert.display(), "certificate reloaded");
                }
                // Perhaps half-way through a renewal: keep serving the old pair, look again
                // at the next check.
                Err(why) => {
                    tracing::warn!(%why, "the changed certificate does not load yet; serving the previous one")
                }
            }
        }
        current.certified.clone()
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
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
    describe_der(&der).map_err(|e| format!("{}: {e}", cert.display()))
}

/// Reads one DER certificate.
pub fn describe_der(der: &[u8]) -> Result<CertificateInfo, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid certificate: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names_of(certified: &CertifiedKey) -> String {
        let (_, cert) =
            x509_parser::parse_x509_certificate(certified.end_entity_cert().expect("cert"))
                .expect("parse");
        cert.subject().to_string()
    }

    /// Writes a self-signed pair for `cn` to `cert`/`key`.
    fn write_pair(cert: &Path, key: &Path, cn: &str) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("p");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let pair = rcgen::KeyPair::generate().expect("key");
        std::fs::write(cert, params.self_signed(&pair).expect("cert").pem()).expect("write");
        std::fs::write(key, pair.serialize_pem()).expect("write");
    }

    #[test]
    fn a_renewed_pair_is_served_after_the_check_interval_and_a_half_written_one_never() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        write_pair(&cert, &key, "first");
        let resolver =
            ReloadingCertificate::new(&cert, &key, Duration::from_millis(50)).expect("load");
        assert_eq!(names_of(&resolver.current()), "CN=first");

        // The certificate is replaced but not yet its key: the old pair stays.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).expect("dir");
        write_pair(&other.join("c.pem"), &other.join("k.pem"), "second");
        std::fs::copy(other.join("c.pem"), &cert).expect("copy");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(names_of(&resolver.current()), "CN=first");
        // Within the interval nothing is looked at, even once the key has arrived.
        std::fs::copy(other.join("k.pem"), &key).expect("copy");
        assert_eq!(names_of(&resolver.current()), "CN=first");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(names_of(&resolver.current()), "CN=second");

        std::fs::write(&key, "garbage").expect("write");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(names_of(&resolver.current()), "CN=second");
        let err = load_pair(&cert, &key).expect_err("no key");
        assert!(!err.contains("garbage"), "{err}");
    }

    #[test]
    fn the_self_signed_certificate_covers_this_machine_and_is_renewed_when_names_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = ensure_self_signed(dir.path(), &["box".into()]).expect("make");
        let info = describe(&cert).expect("describe");
        assert_eq!(info.names, ["localhost", "127.0.0.1", "::1", "box"]);
        assert!(info.self_signed);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let days = (info.not_after - now) / 86_400;
        assert!((360..=366).contains(&days), "{days}");
        load_pair(&cert, &key).expect("the key goes with it");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pem = std::fs::read(&cert).expect("read");
        ensure_self_signed(dir.path(), &["box".into()]).expect("reuse");
        assert_eq!(std::fs::read(&cert).expect("read"), pem, "reused");
        ensure_self_signed(dir.path(), &["box".into(), "192.168.1.7".into()]).expect("renew");
        let info = describe(&cert).expect("describe");
        assert!(info.names.contains(&"192.168.1.7".to_string()), "{info:?}");
    }
}
