//! In transit: what the listener negotiates, the headers on every answer, certificates
//! renewed under a running service, and outbound clients that refuse what they cannot verify.

use crate::security::production_setup;
use crate::support::{self, port_of, sparkle, Service, TestCa};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn der(pem_file: &Path) -> CertificateDer<'static> {
    let pem = std::fs::read(pem_file).expect("pem");
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a certificate")
        .expect("pem")
}

/// A rustls client limited to `versions`, offering h2 and HTTP/1.1, trusting `root`: GETs
/// /healthz and says which version and application protocol were agreed, and the status line.
fn speak(
    port: u16,
    versions: &[&'static rustls::SupportedProtocolVersion],
    root: CertificateDer<'static>,
) -> (rustls::ProtocolVersion, Option<Vec<u8>>, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = "localhost".try_into().expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let status = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let version = conn.protocol_version().expect("negotiated");
    (version, conn.alpn_protocol().map(<[u8]>::to_vec), status)
}

/// A TLS 1.1 ClientHello (no supported_versions extension), as an old client sends it.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version: TLS 1.1
    body.extend([0x5a; 32]); // random
    body.push(0); // no session id
                  // What TLS 1.1 clients offer (AES-CBC), and the AES-GCM suites the server has, so that
                  // the version is the one thing the two sides cannot agree on.
    let suites: [u16; 6] = [0xc02b, 0xc02f, 0xc013, 0xc014, 0x002f, 0x0035];
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    suites.iter().for_each(|s| body.extend(s.to_be_bytes()));
    body.extend([1, 0]); // compression: null
    let host = b"localhost";
    let mut sni = ((host.len() + 3) as u16).to_be_bytes().to_vec();
    sni.push(0);
    sni.extend((host.len() as u16).to_be_bytes());
    sni.extend(host);
    let mut extensions = Vec::new();
    let mut extension = |kind: u16, data: &[u8]| {
        extensions.extend(kind.to_be_bytes());
        extensions.extend((data.len() as u16).to_be_bytes());
        extensions.extend(data);
    };
    extension(0x0000, &sni); // server_name
    extension(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, secp256r1
    extension(0x000b, &[1, 0]); // EC point formats: uncompressed
                                // Signature algorithms: ECDSA P-256 SHA-256, RSA-PSS SHA-256, RSA PKCS#1 SHA-256.
    extension(0x000d, &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]);
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![1]; // client_hello
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_3_is_preferred_1_2_accepted_and_1_1_refused() {
    let svc = Service::start(&[]).await;
    let port = port_of(&svc.url);
    let root = der(&svc.certificate());
    let checks = tokio::task::spawn_blocking(move || {
        use rustls::version::{TLS12, TLS13};
        let both = speak(port, &[&TLS13, &TLS12], root.clone());
        let only_12 = speak(port, &[&TLS12], root);

        let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        sock.write_all(&tls11_client_hello()).expect("hello");
        let mut answer = Vec::new();
        let _ = sock.read_to_end(&mut answer);
        (both, only_12, answer)
    })
    .await
    .expect("client thread");
    let (both, only_12, old) = checks;
    assert_eq!(both.0, rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(both.1.as_deref(), Some(&b"http/1.1"[..]), "HTTP/1.1 only");
    assert_eq!(both.2, "HTTP/1.1 200 OK");
    assert_eq!(only_12.0, rustls::ProtocolVersion::TLSv1_2);
    assert_eq!(only_12.2, "HTTP/1.1 200 OK");
    // An alert record (21), fatal, protocol_version (70); never a ServerHello (22).
    assert!(old.len() >= 7, "{old:?}");
    assert_eq!((old[0], old[5], old[6]), (21, 2, 70), "{old:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_the_security_headers() {
    let svc = Service::start(&[]).await;
    let client = svc.client();
    let at = |route: &str| format!("{}{route}", svc.url);
    let answers = vec![
        ("healthz", client.get(at("/healthz")).send().await),
        ("no route", client.get(at("/nowhere")).send().await),
        (
            "no key",
            client
                .post(at("/v1/jobs"))
                .json(&json!({"prompt": "a"}))
                .send()
                .await,
        ),
        (
            "too large",
            client
                .post(at("/v1/jobs"))
                .bearer_auth(&svc.admin_key)
                .json(&json!({"prompt": "y".repeat(100_000)}))
                .send()
                .await,
        ),
        (
            "accepted",
            client
                .post(at("/v1/jobs"))
                .bearer_auth(&svc.admin_key)
                .json(&json!({"prompt": "a", "size": "64x64", "steps": 1}))
                .send()
                .await,
        ),
    ];
    for (what, answer) in answers {
        let answer = answer.expect("answer");
        let h = answer.headers();
        let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(
            header("strict-transport-security").starts_with("max-age=63072000"),
            "{what}: {h:?}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff", "{what}");
        assert_eq!(header("x-frame-options"), "DENY", "{what}");
        assert!(
            header("content-security-policy").contains("frame-ancestors 'none'"),
            "{what}"
        );
        assert_eq!(header("referrer-policy"), "no-referrer", "{what}");
        assert_eq!(header("cache-control"), "no-store", "{what}");
    }
}

/// The certificate a fresh connection to `url` is served.
async fn served_certificate(url: &str, ca: &Path) -> Vec<u8> {
    let pem = std::fs::read(ca).expect("ca");
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .tls_info(true)
        .build()
        .expect("client");
    let answer = client
        .get(format!("{url}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(answer.status(), 200);
    answer
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("the peer certificate")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_on_new_connections_without_a_restart() {
    let root = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    let config = production_setup(root.path(), &ca);
    let ca_file = ca.write(root.path());
    let dir = root.path().to_path_buf();
    let svc =
        Service::start_configured(root, config, &ca_file, &[("SPARKLE_TLS__RELOAD_SECS", "1")])
            .await;
    let pid = svc.pid();
    let first = der(&dir.join("server.pem"));
    assert_eq!(served_certificate(&svc.url, &ca_file).await, first.as_ref());

    ca.issue(&dir, "server", "renewed.sparkle.test", 60);
    let renewed = der(&dir.join("server.pem"));
    assert_ne!(renewed, first);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if served_certificate(&svc.url, &ca_file).await == renewed.as_ref() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(svc.pid(), pid, "the same process");
    assert!(svc.log().contains("certificate reloaded"), "{}", svc.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_clients_refuse_a_certificate_they_cannot_verify() {
    // The running service is an https server whose self-signed certificate nobody trusts.
    let svc = Service::start(&[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("models");
    let (ok, _, err) = sparkle(
        &[
            "model",
            "pull",
            "acme/tiny",
            "--endpoint",
            &svc.url,
            "--dir",
            models.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(!ok && err.contains("certificate"), "{err}");

    let token = dir.path().join("bot-token");
    std::fs::write(&token, "bot-t0ken").expect("token");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let api = format!("{}/api/v10", svc.url);
    let data = dir.path().join("data");
    let (ok, _, err) = sparkle(
        &[
            "discord",
            "register",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--model",
            support::tiny_model().to_str().expect("utf-8"),
        ],
        &[
            ("SPARKLE_DISCORD__API_BASE", api.as_str()),
            ("SPARKLE_DISCORD__APPLICATION_ID", "\"900\""),
            (
                "SPARKLE_DISCORD__BOT_TOKEN_FILE",
                token.to_str().expect("utf-8"),
            ),
        ],
    );
    assert!(!ok && err.contains("certificate"), "{err}");
    assert!(!err.contains("bot-t0ken"), "{err}");

    // Under the production profile a plain-http Discord is a configuration error.
    let (ok, _, err) = sparkle(
        &[
            "discord",
            "register",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
        &[
            ("SPARKLE_PROFILE", "production"),
            ("SPARKLE_TLS__CERT_FILE", "/nonexistent/cert.pem"),
            ("SPARKLE_TLS__KEY_FILE", "/nonexistent/key.pem"),
            ("SPARKLE_DISCORD__API_BASE", "http://127.0.0.1:9/api/v10"),
        ],
    );
    assert!(!ok && err.contains("discord.api_base"), "{err}");
}
