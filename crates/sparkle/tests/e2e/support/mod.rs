//! A running `sparkle up` for tests: its own data directory, loopback port, tiny model and
//! an HTTPS client that trusts exactly its self-signed certificate.

use serde_json::Value;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sparkle");

/// The tiny model, written once per test run.
pub fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-model");
        let _ = std::fs::remove_dir_all(&dir);
        let status = Command::new(BIN)
            .args(["model", "tiny"])
            .arg(&dir)
            .status()
            .expect("run sparkle model tiny");
        assert!(status.success(), "sparkle model tiny failed");
        dir
    })
}

pub struct Service {
    child: Child,
    /// Holds the data directory (and any configuration) until the service is dropped.
    _root: tempfile::TempDir,
    data: PathBuf,
    config: Option<PathBuf>,
    pub url: String,
    pub metrics_url: String,
    pub admin_key: String,
    client: reqwest::Client,
}

impl Service {
    /// `sparkle up` under the dev profile, in a new data directory.
    pub async fn start(env: &[(&str, &str)]) -> Service {
        let root = tempfile::tempdir().expect("tempdir");
        let data = root.path().to_path_buf();
        let (child, (url, metrics_url), key) = spawn_up(&data, None, env);
        let client = client_for(&data.join("tls/cert.pem"));
        let mut svc = Service {
            child,
            _root: root,
            data,
            config: None,
            url,
            metrics_url,
            admin_key: key.expect("the first start prints an admin key"),
            client,
        };
        svc.wait_ready().await;
        svc
    }

    /// `sparkle up --config CONFIG` with its data in `root/data`, spoken to by a client that
    /// trusts only the CA certificate `ca`.
    pub async fn start_configured(
        root: tempfile::TempDir,
        config: PathBuf,
        ca: &Path,
        env: &[(&str, &str)],
    ) -> Service {
        let data = root.path().join("data");
        let (child, (url, metrics_url), key) = spawn_up(&data, Some(&config), env);
        let mut svc = Service {
            child,
            _root: root,
            data,
            config: Some(config),
            url,
            metrics_url,
            admin_key: key.expect("the first start prints an admin key"),
            client: client_for(ca),
        };
        svc.wait_ready().await;
        svc
    }

    /// The HTTPS client that trusts this service.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Starts `sparkle up` again on the same data directory.
    pub async fn restart(&mut self, env: &[(&str, &str)]) {
        let (child, urls, key) = spawn_up(&self.data, self.config.as_deref(), env);
        assert!(
            key.is_none(),
            "the admin key is printed on the first start only"
        );
        self.child = child;
        (self.url, self.metrics_url) = urls;
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // The liveness probe: /readyz spends the test address's request rate.
            if let Ok(r) = self
                .client
                .get(format!("{}/healthz", self.url))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sparkle up never became ready; log:\n{}", self.log());
    }

    /// The service's self-signed certificate, for clients that take a CA file.
    pub fn certificate(&self) -> PathBuf {
        self.data.join("tls/cert.pem")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_exit(&mut self) {
        let _ = self.child.wait();
    }

    /// Worker processes started by this service's scaler.
    pub fn worker_pids(&self) -> Vec<u32> {
        let parent = self.pid().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid …; comm may contain spaces, so split after the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let fields: Vec<_> = rest.split_whitespace().collect();
            if fields.get(1) == Some(&parent.as_str()) && fields.first() != Some(&"Z") {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse() {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("test.log")).unwrap_or_default()
    }

    /// Rows in the jobs table, read straight from the database file.
    pub fn job_count(&self) -> i64 {
        let out = Command::new("python3")
            .arg("-c")
            .arg("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from jobs').fetchone()[0])")
            .arg(self.data.join("sparkle.db"))
            .output()
            .expect("python3 reads the database");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a count")
    }

    pub async fn create_key(&self, name: &str) -> String {
        self.key_command(&["create", "--name", name]).0
    }

    /// `sparkle key ARGS…` on this service's data: (stdout, stderr), refusing failure.
    pub fn key_command(&self, args: &[&str]) -> (String, String) {
        let out = Command::new(BIN)
            .arg("key")
            .args(args)
            .arg("--data-dir")
            .arg(&self.data)
            .args(
                self.config
                    .iter()
                    .flat_map(|c| [OsStr::new("--config"), c.as_os_str()]),
            )
            .output()
            .expect("sparkle key");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub async fn post_json(&self, route: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
        self.post_json_with(route, body, key.unwrap_or(""), &[])
            .await
    }

    pub async fn post_json_with(
        &self,
        route: &str,
        body: &Value,
        key: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.client.post(format!("{}{route}", self.url)).json(body);
        if !key.is_empty() {
            req = req.bearer_auth(key);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, route: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{route}", self.url))
            .bearer_auth(key.unwrap_or_default())
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs a raw JSON body with Discord's signature headers (each only when given).
    pub async fn post_signed(
        &self,
        route: &str,
        body: &str,
        signature: Option<&str>,
        timestamp: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .post(format!("{}{route}", self.url))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(signature) = signature {
            req = req.header("x-signature-ed25519", signature);
        }
        if let Some(timestamp) = timestamp {
            req = req.header("x-signature-timestamp", timestamp);
        }
        let r = req.send().await.expect("request");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, route: &str, key: &str) -> (u16, Vec<u8>) {
        let r = self
            .client
            .get(format!("{}{route}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.bytes().await.expect("body").to_vec())
    }

    /// The admin listener's Prometheus text.
    pub async fn metrics(&self) -> String {
        let r = self
            .client
            .get(&self.metrics_url)
            .send()
            .await
            .expect("metrics");
        assert_eq!(r.status(), 200);
        r.text().await.expect("text")
    }

    pub async fn get_json(&self, route: &str, key: &str) -> Value {
        let (status, body) = self.get(route, key).await;
        assert_eq!(status, 200, "{route}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("json")
    }

    pub async fn delete(&self, route: &str, key: &str) -> (u16, Value) {
        let r = self
            .client
            .delete(format!("{}{route}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Polls the job until `done` holds (two minutes at most).
    pub async fn wait_for(&self, id: &str, key: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let job = self.get_json(&format!("/v1/jobs/{id}"), key).await;
            if done(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job never got there: {job}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads the job's server-sent events until the stream ends.
    pub async fn events(&self, id: &str, key: &str) -> Vec<(String, Value)> {
        let mut r = self
            .client
            .get(format!("{}/v1/jobs/{id}/events", self.url))
            .bearer_auth(key)
            .send()
            .await
            .expect("events");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut text = String::new();
        let stream = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(chunk) = r.chunk().await.expect("chunk") {
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
        });
        stream
            .await
            .expect("the event stream ends after the final event");
        text.split("\n\n")
            .filter_map(|block| {
                let mut name = String::from("message");
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = serde_json::from_str(v.trim()).ok();
                    }
                }
                data.map(|d| (name, d))
            })
            .collect()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- sparkle log ----\n{}", self.log());
        }
    }
}

pub fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status();
}

/// Another server process on a service's data directory (a second gateway); stopped when
/// dropped.
pub struct Beside {
    child: Child,
    pub url: String,
}

impl Drop for Beside {
    fn drop(&mut self) {
        kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// `sparkle ROLE` (`gateway`, …) on this service's data directory, with `env`.
    pub fn start_beside(&self, role: &str, env: &[(&str, &str)]) -> Beside {
        let (child, (url, _), _) = spawn_role(role, &self.data, self.config.as_deref(), env);
        Beside { child, url }
    }
}

fn spawn_up(
    data: &Path,
    config: Option<&Path>,
    env: &[(&str, &str)],
) -> (Child, (String, String), Option<String>) {
    spawn_role("up", data, config, env)
}

#[allow(clippy::zombie_processes)] // the Service or Beside that owns the child waits for it on drop
fn spawn_role(
    role: &str,
    data: &Path,
    config: Option<&Path>,
    env: &[(&str, &str)],
) -> (Child, (String, String), Option<String>) {
    std::fs::create_dir_all(data).expect("data directory");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("test.log"))
        .expect("log file");
    let mut child = Command::new(BIN)
        .args([
            role,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data)
        .args(
            config
                .iter()
                .flat_map(|c| [OsStr::new("--config"), c.as_os_str()]),
        )
        .arg("--model")
        .arg(tiny_model())
        .env("SPARKLE_QUEUE__LEASE_TIMEOUT_SECS", "10")
        .env("SPARKLE_WORKER__HEARTBEAT_SECS", "1")
        .env("SPARKLE_SCALER__TICK_MS", "200")
        .env("SPARKLE_WORKER__DEVICE", "cpu")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn sparkle up");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut key = None;
    let mut metrics = String::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("sparkle up prints its URL");
        if let Some(k) = line.strip_prefix("Admin API key (shown once; only its hash is stored): ")
        {
            key = Some(k.trim().to_string());
        }
        if let Some(url) = line.strip_prefix("Metrics at ") {
            metrics = url.trim().to_string();
        }
        if let Some(url) = line.strip_prefix("Sparkle is up at ") {
            return (child, (url.trim().to_string(), metrics), key);
        }
    }
}

/// An HTTPS client that trusts only the certificate (or CA) in `trusted`.
pub fn client_for(trusted: &Path) -> reqwest::Client {
    let pem = std::fs::read(trusted).expect("the certificate to trust");
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .timeout(Duration::from_secs(180))
        .build()
        .expect("client")
}

/// `sparkle generate` of one image with the tiny model on the CPU; the PNG's bytes.
pub fn generate_solo(prompt: &str, seed: u32, size: &str, steps: u32) -> Vec<u8> {
    let (seed, steps) = (seed.to_string(), steps.to_string());
    generate_with(
        tiny_model(),
        prompt,
        &["--size", size, "--seed", &seed, "--steps", &steps],
    )
}

/// `sparkle generate` of one image with `model` on the CPU and these arguments; the PNG's
/// bytes.
pub fn generate_with(model: &Path, prompt: &str, args: &[&str]) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().expect("tempfile");
    let status = Command::new(BIN)
        .args(["generate", prompt, "--device", "cpu"])
        .args(args)
        .arg("-o")
        .arg(out.path())
        .arg("--model")
        .arg(model)
        .stderr(Stdio::null())
        .status()
        .expect("sparkle generate");
    assert!(status.success(), "sparkle generate failed");
    std::fs::read(out.path()).expect("png")
}

/// A loopback port for a server a test starts again on the same address after killing it:
/// below the kernel's ephemeral range (where every `:0` bind of the tests running beside it
/// lands), never handed out twice in this run, and free when handed out.
pub fn fixed_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.max(10_001));
    let start = low + std::process::id() % (high - low);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < high - low, "no free port below the ephemeral range");
        let port = (low + (start - low + n) % (high - low)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The RGB8 pixels of a PNG.
pub fn png_pixels(bytes: &[u8]) -> Vec<u8> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("frame");
    buf.truncate(info.buffer_size());
    buf
}

/// Width, height and the `parameters` text chunk of a PNG.
pub fn png_info(bytes: &[u8]) -> (u32, u32, String) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().expect("a PNG");
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|t| t.keyword == "parameters")
                .and_then(|t| t.get_text().ok())
        })
        .unwrap_or_default();
    (info.width, info.height, text)
}

/// A certificate authority for tests: it signs server certificates that clients trusting
/// only `ca.pem` accept.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Sparkle test CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let pem = params.self_signed(&key).expect("ca").pem();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// Writes `NAME.pem` (the certificate, for localhost and 127.0.0.1, valid for `days`)
    /// and `NAME.key` (mode 0600) in `dir`, replacing earlier files of that name atomically.
    pub fn issue(
        &self,
        dir: &Path,
        name: &str,
        common_name: &str,
        days: i64,
    ) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        let write = |path: &Path, text: String, mode: u32| {
            let temp = path.with_extension("new");
            std::fs::write(&temp, text).expect("write");
            std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode)).expect("chmod");
            std::fs::rename(&temp, path).expect("rename");
        };
        write(&key_path, key.serialize_pem(), 0o600);
        write(&cert_path, cert.pem(), 0o644);
        (cert_path, key_path)
    }
}

impl TestCa {
    /// Writes the CA certificate to `dir/ca.pem`, for clients to trust.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).expect("ca");
        path
    }
}

/// Runs `sparkle ARGS…`: (success, stdout, stderr).
pub fn sparkle(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run sparkle");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The port of a `https://HOST:PORT` URL.
pub fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

/// A blocking TLS connection to `127.0.0.1:port` that trusts the certificate in `trusted`
/// (handshake done); reads give up after 15 seconds.
pub fn tls_connect(
    port: u16,
    trusted: &Path,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(trusted)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = "localhost".try_into().map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(std::io::Error::other)?;
    let sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// Reads until the peer closes the connection; how long that took, with what was read, or
/// `None` if it was still open when the reads gave up.
pub fn until_closed(stream: &mut impl std::io::Read) -> (Option<Duration>, Vec<u8>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (Some(started.elapsed()), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (None, got)
            }
            Err(_) => return (Some(started.elapsed()), got),
        }
    }
}
