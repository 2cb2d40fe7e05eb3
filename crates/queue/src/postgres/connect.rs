//! Connections to PostgreSQL: the connection string (several hosts, `target_session_attrs`),
//! TLS verified against a CA file, and a password read from a file for every new connection,
//! so that a rotated password or a short-lived token takes effect without a restart.

use super::PgOptions;
use crate::QueueError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How connections are protected in transit.
#[derive(Clone)]
pub(crate) enum Transport {
    /// TLS, the server's certificate verified against the CA and its name against the host.
    Verified(MakeRustlsConnect),
    /// No TLS (`sslmode=disable`): refused under the production profile.
    Plain,
}

/// Everything needed to open one more connection.
#[derive(Clone)]
pub(crate) struct Connector {
    config: tokio_postgres::Config,
    password_file: Option<PathBuf>,
    transport: Transport,
}

/// What a connection string says beyond what the client parses itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    /// The string with `sslmode` and `sslrootcert` taken out (the client does not know
    /// `verify-full`); never printed, it may hold a password.
    rest: String,
    /// `disable`, or TLS verified in full (the default; `require`, `verify-ca` and
    /// `verify-full` all verify the CA and the server's name).
    pub tls: bool,
    /// `sslrootcert`, when the string names one.
    pub ca_file: Option<PathBuf>,
    /// Whether the string itself holds a password (better kept in `password_file`).
    pub has_password: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("hosts", &self.config.get_hosts())
            .field("tls", &matches!(self.transport, Transport::Verified(_)))
            .finish_non_exhaustive()
    }
}

fn config_error(reason: impl Into<String>) -> QueueError {
    QueueError::Config(reason.into())
}

impl DatabaseUrl {
    /// Reads a `postgres://` (or `postgresql://`) connection string.
    pub fn parse(url: &str) -> Result<DatabaseUrl, QueueError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        if !(base.starts_with("postgres://") || base.starts_with("postgresql://")) {
            return Err(config_error(
                "database.url must start with postgres:// (or postgresql://)",
            ));
        }
        let mut tls = true;
        let mut ca_file = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => match value {
                    "disable" => tls = false,
                    "require" | "verify-ca" | "verify-full" => tls = true,
                    other => {
                        return Err(config_error(format!(
                            "database.url: sslmode={other} is not supported: use verify-full \
                             (the default) or disable"
                        )))
                    }
                },
                "sslrootcert" => ca_file = Some(PathBuf::from(percent_decode(value))),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let parsed: tokio_postgres::Config = rest.parse().map_err(|e| {
            config_error(format!(
                "database.url is not a valid connection string: {e}"
            ))
        })?;
        Ok(DatabaseUrl {
            has_password: parsed.get_password().is_some(),
            rest,
            tls,
            ca_file,
        })
    }

    /// The hosts the string lists, for reports.
    pub fn hosts(&self) -> Vec<String> {
        let parsed: tokio_postgres::Config = match self.rest.parse() {
            Ok(parsed) => parsed,
            Err(_) => return Vec::new(),
        };
        let ports = parsed.get_ports();
        parsed
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let name = match host {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                };
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{name}:{port}")
            })
            .collect()
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let Ok(b) = u8::from_str_radix(value.get(i + 1..i + 3).unwrap_or(""), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The TLS client configuration trusting only the certificates in `ca_file`.
pub(crate) fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, QueueError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let cannot = |e: String| config_error(format!("database CA file {}: {e}", ca_file.display()));
    let pem = std::fs::read(ca_file).map_err(|e| cannot(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| cannot(e.to_string()))?;
        roots.add(cert).map_err(|e| cannot(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(cannot("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cannot(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Connector {
    pub fn new(options: &PgOptions) -> Result<Connector, QueueError> {
        let url = DatabaseUrl::parse(&options.url)?;
        let mut config: tokio_postgres::Config = url
            .rest
            .parse()
            .map_err(|e| config_error(format!("database.url: {e}")))?;
        config.connect_timeout(options.connect_timeout);
        config.application_name("sparkle");
        if let Some(path) = &options.search_path {
            config.options(format!("-c search_path={path}"));
        }
        let transport = if url.tls {
            let ca_file = options.ca_file.clone().or(url.ca_file).ok_or_else(|| {
                config_error(
                    "TLS to the database needs database.ca_file (the CA that signed the \
                     server's certificate), or sslmode=disable in database.url",
                )
            })?;
            config.ssl_mode(SslMode::Require);
            Transport::Verified(MakeRustlsConnect::new(tls_config(&ca_file)?))
        } else {
            config.ssl_mode(SslMode::Disable);
            Transport::Plain
        };
        if let Some(path) = &options.password_file {
            read_password(path)?;
        }
        Ok(Connector {
            config,
            password_file: options.password_file.clone(),
            transport,
        })
    }

    pub fn tls(&self) -> bool {
        matches!(self.transport, Transport::Verified(_))
    }

    /// Opens a connection, with the password as the file holds it now; the connection's
    /// task runs until the connection closes.
    pub async fn connect(&self) -> Result<Client, QueueError> {
        let (client, _) = self.connect_with(|_| {}).await?;
        Ok(client)
    }

    /// Opens a connection whose server messages (notifications) go to `on_message`; returns
    /// the client and the task driving the connection.
    pub async fn connect_with(
        &self,
        on_message: impl FnMut(tokio_postgres::AsyncMessage) + Send + 'static,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), QueueError> {
        let mut config = self.config.clone();
        if let Some(path) = &self.password_file {
            config.password(read_password(path)?.as_bytes());
        }
        match &self.transport {
            Transport::Verified(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                Ok((client, tokio::spawn(drive(connection, on_message))))
            }
            Transport::Plain => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                Ok((client, tokio::spawn(drive(connection, on_message))))
            }
        }
    }
}

async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    mut on_message: impl FnMut(tokio_postgres::AsyncMessage),
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(message)) => on_message(message),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "a database connection closed");
                return;
            }
            None => return,
        }
    }
}

/// The password in `path`, without a trailing newline. A file others can read is refused.
fn read_password(path: &Path) -> Result<zeroize::Zeroizing<String>, QueueError> {
    let cannot =
        |e: String| config_error(format!("database.password_file {}: {e}", path.display()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| cannot(e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(cannot(format!(
                "others can read it (mode {:o}); chmod 600 it",
                mode & 0o777
            )));
        }
    }
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| cannot(e.to_string()))?);
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(cannot("is empty".into()));
    }
    Ok(zeroize::Zeroizing::new(password.to_string()))
}

/// The pool's manager: each connection made with the password as it stands.
pub(crate) struct Manager(pub Connector);

impl deadpool::managed::Manager for Manager {
    type Type = Client;
    type Error = QueueError;

    async fn create(&self) -> Result<Client, QueueError> {
        self.0.connect().await
    }

    async fn recycle(
        &self,
        client: &mut Client,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<QueueError> {
        if client.is_closed() {
            return Err(deadpool::managed::RecycleError::message(
                "the connection closed",
            ));
        }
        Ok(())
    }
}

pub(crate) type Pool = deadpool::managed::Pool<Manager>;

/// The certificate chain the first host of the connection string presents, verified against
/// the CA as every connection verifies it: for audits (names, expiry). Speaks only
/// PostgreSQL's TLS request and the handshake; never logs in.
pub async fn server_certificates(
    options: &PgOptions,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, QueueError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = DatabaseUrl::parse(&options.url)?;
    if !url.tls {
        return Err(config_error(
            "the connection string turns TLS off (sslmode=disable)",
        ));
    }
    let ca_file = options
        .ca_file
        .clone()
        .or(url.ca_file.clone())
        .ok_or_else(|| config_error("no database.ca_file to verify the server against"))?;
    let host = url
        .hosts()
        .into_iter()
        .next()
        .ok_or_else(|| config_error("the connection string names no TCP host"))?;
    let (name, _) = host
        .rsplit_once(':')
        .ok_or_else(|| config_error("the connection string names no TCP host"))?;
    let name = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let unreachable = |e: std::io::Error| QueueError::Unavailable(format!("{host}: {e}"));
    let mut stream = tokio::time::timeout(
        options.connect_timeout,
        tokio::net::TcpStream::connect(&host),
    )
    .await
    .map_err(|_| QueueError::Unavailable(format!("{host}: no answer in time")))?
    .map_err(unreachable)?;
    // SSLRequest: length 8, code 80877103.
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .map_err(unreachable)?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.map_err(unreachable)?;
    if answer[0] != b'S' {
        return Err(config_error(format!("{host} does not accept TLS")));
    }
    let server_name = rustls::pki_types::ServerName::try_from(name)
        .map_err(|e| config_error(format!("{host}: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&ca_file)?))
        .connect(server_name, stream)
        .await
        .map_err(|e| config_error(format!("{host}: TLS handshake: {e}")))?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default())
}
