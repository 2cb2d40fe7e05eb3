use super::*;
use crate::config::DiscordConfig;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A certificate for `names`, valid from `from_days` to `until_days` (days from now), signed
/// by a throwaway CA unless `self_signed`; its chain and key are written to `dir`.
fn certificate(
    dir: &Path,
    name: &str,
    from_days: i64,
    until_days: i64,
    self_signed: bool,
) -> (PathBuf, PathBuf) {
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.not_before = now + time::Duration::days(from_days);
    params.not_after = now + time::Duration::days(until_days);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = if self_signed {
        params.self_signed(&key).expect("self-signed")
    } else {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Sparkle test CA");
        let issuer = rcgen::Issuer::new(ca, rcgen::KeyPair::generate().expect("ca key"));
        params.signed_by(&key, &issuer).expect("signed")
    };
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (cert_path, key_path)
}

fn dev(dir: &Path) -> Config {
    Config {
        data_dir: dir.join("data"),
        ..Config::default()
    }
}

/// A production configuration whose every check passes: a CA-signed certificate with 90
/// days left, a keyring, loopback listeners.
fn production(dir: &Path) -> Config {
    let (cert, key) = certificate(dir, "good", -1, 90, false);
    let mut config = dev(dir);
    config.profile = Profile::Production;
    config.tls.cert_file = Some(cert);
    config.tls.key_file = Some(key);
    config.prepare_data_dir().expect("data dir");
    // Kept apart from the data it protects.
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    chmod(&secrets, 0o700);
    config.encryption.keyring_file = Some(secrets.join("keyring"));
    let ring = sparkle_seal::Keyring::generate(crate::keyring::now());
    crate::keyring::write(&crate::keyring::path(&config), &ring).expect("keyring");
    config
}

#[tokio::test]
async fn production_fails_a_keyring_kept_in_the_data_directory_it_protects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = production(dir.path());
    let ring = sparkle_seal::Keyring::generate(crate::keyring::now());
    config.encryption.keyring_file = None;
    crate::keyring::write(&crate::keyring::path(&config), &ring).expect("keyring");
    let report = gather(&config, Depth::Startup).await;
    let line = check(&report, "encryption");
    assert!(line.failed(), "{line}");
    assert!(
        line.to_string().contains("data directory it protects"),
        "{line}"
    );
    // Named explicitly, but still inside: the same.
    config.encryption.keyring_file = Some(config.data_dir.join("keyring"));
    assert!(check(&gather(&config, Depth::Startup).await, "encryption").failed());
    // The dev profile keeps it there by default, and passes.
    config.encryption.keyring_file = None;
    config.profile = Profile::Dev;
    assert!(!check(&gather(&config, Depth::Startup).await, "encryption").failed());
}

fn check<'a>(report: &'a Report, name: &str) -> &'a Check {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}"))
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[tokio::test]
async fn a_sound_production_setup_passes_every_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = production(dir.path());
    let report = gather(&config, Depth::Full).await;
    for line in &report.checks {
        assert!(!line.failed(), "{line}");
    }
    assert_eq!(
        check(&report, "database-tls").to_string(),
        "n/a   database-tls  SQLite on local disk"
    );
    let cert = check(&report, "certificate");
    assert!(cert.reason.contains("key matches"), "{cert}");
    assert!(cert.reason.contains("localhost"), "{cert}");
    report.refuse_critical().expect("starts");
}

#[tokio::test]
async fn a_fresh_dev_setup_passes_and_says_what_the_first_start_makes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = gather(&dev(dir.path()), Depth::Full).await;
    for line in &report.checks {
        assert!(!line.failed(), "{line}");
    }
    assert!(check(&report, "certificate").reason.contains("first start"));
    assert!(check(&report, "encryption").reason.contains("first start"));
}

#[tokio::test]
async fn certificates_fail_when_expired_early_short_lived_mismatched_or_self_signed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = production(dir.path());
    let cases = [
        ("expired", -30, -1, false, true, "expired"),
        ("early", 2, 90, false, true, "not valid before"),
        ("short", -1, 5, false, false, "days left"),
        ("selfsigned", -1, 90, true, false, "self-signed"),
    ];
    for (name, from, until, self_signed, critical, says) in cases {
        let (cert, key) = certificate(dir.path(), name, from, until, self_signed);
        config.tls.cert_file = Some(cert);
        config.tls.key_file = Some(key);
        let line = transit::certificate(&config, now());
        assert_eq!(line.status, Status::Fail { critical }, "{name}: {line}");
        assert!(line.reason.contains(says), "{name}: {line}");
    }
    let (cert, _) = certificate(dir.path(), "one", -1, 90, false);
    let (_, other_key) = certificate(dir.path(), "two", -1, 90, false);
    config.tls.cert_file = Some(cert);
    config.tls.key_file = Some(other_key);
    let line = transit::certificate(&config, now());
    assert!(line.is_critical(), "{line}");
    assert!(line.reason.contains("does not go with"), "{line}");
    config.tls.key_file = Some(dir.path().join("missing.key"));
    assert!(transit::certificate(&config, now()).is_critical());
}

#[tokio::test]
async fn production_refuses_to_start_on_a_critical_failure_and_dev_only_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = production(dir.path());
    config.admin_listen = "0.0.0.0:9464".parse().expect("addr");
    let report = gather(&config, Depth::Startup).await;
    let admin = check(&report, "admin");
    assert!(admin.is_critical(), "{admin}");
    assert!(admin.to_string().ends_with("[critical]"), "{admin}");
    let err = report.refuse_critical().expect_err("refused");
    assert!(format!("{err:#}").contains("admin"), "{err:#}");

    config.admin_listen = "10.0.0.5:9464".parse().expect("addr");
    assert!(!access::admin(&config).failed(), "a private network");

    config.profile = Profile::Dev;
    config.admin_listen = "0.0.0.0:9464".parse().expect("addr");
    gather(&config, Depth::Startup)
        .await
        .refuse_critical()
        .expect("the dev profile starts");
}

#[tokio::test]
async fn secret_files_readable_by_others_are_critical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = production(dir.path());
    let token = dir.path().join("bot-token");
    std::fs::write(&token, "t0ken").expect("write");
    chmod(&token, 0o600);
    config.discord = DiscordConfig {
        bot_token_file: Some(token.clone()),
        ..DiscordConfig::default()
    };
    let line = access::secrets(&config);
    assert!(!line.failed(), "{line}");
    assert!(
        line.reason.contains("discord.bot_token_file (600)"),
        "{line}"
    );
    chmod(&token, 0o644);
    let line = access::secrets(&config);
    assert!(line.is_critical(), "{line}");
    assert!(line.reason.contains("chmod 600"), "{line}");
    assert!(!line.reason.contains("t0ken"));
    chmod(&token, 0o600);
    chmod(config.tls.key_file.as_ref().expect("key"), 0o640);
    assert!(access::secrets(&config).is_critical());
    std::fs::remove_file(&token).expect("rm");
    assert!(access::secrets(&config).reason.contains("bot_token_file"));
}

#[tokio::test]
async fn encryption_fails_without_a_keyring_or_when_stored_data_needs_a_missing_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = production(dir.path());
    let ring_path = crate::keyring::path(&config);
    chmod(&ring_path, 0o644);
    let line = at_rest::encryption(&config, Depth::Startup).await;
    assert!(line.is_critical(), "{line}");
    chmod(&ring_path, 0o600);

    // An image sealed under a key that a replaced keyring no longer holds.
    let ring = crate::keyring::read(&ring_path).expect("ring");
    let store = sparkle_store::ObjectImageStore::local(
        &config.images_dir(),
        std::sync::Arc::new(sparkle_seal::MasterKeys::fixed(ring.clone())),
    )
    .expect("store");
    let image = sparkle_store::ImageKey {
        job: sparkle_core::JobId::random(),
        index: 0,
    };
    sparkle_store::ImageStore::put(&store, image, Some(1), b"\x89PNG".to_vec().into())
        .await
        .expect("put");
    let line = at_rest::encryption(&config, Depth::Full).await;
    assert!(!line.failed(), "{line}");
    assert!(line.reason.contains("1 image(s)"), "{line}");
    assert!(line.reason.contains(ring.active_id().as_str()), "{line}");
    let other = sparkle_seal::Keyring::generate(crate::keyring::now());
    crate::keyring::write(&ring_path, &other).expect("replace");
    let line = at_rest::encryption(&config, Depth::Full).await;
    assert_eq!(line.status, Status::Fail { critical: false }, "{line}");
    assert!(line.reason.contains("keyring lacks"), "{line}");

    std::fs::remove_file(&ring_path).expect("rm");
    assert!(at_rest::encryption(&config, Depth::Startup)
        .await
        .is_critical());
}

#[tokio::test]
async fn keys_are_counted_from_the_database_without_changing_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = production(dir.path());
    {
        let queue = crate::cmd::open_queue(&config).await.expect("queue");
        queue
            .create_key("admin", &[sparkle_queue::Scope::Admin])
            .await
            .expect("key");
        let (k, _) = queue
            .create_key("ci", &[sparkle_queue::Scope::Generate])
            .await
            .expect("key");
        queue
            .create_key("old", &[sparkle_queue::Scope::Read])
            .await
            .expect("key");
        queue.revoke_key(&k.id).await.expect("revoke");
    }
    let line = access::api_keys(&config, Depth::Full).await;
    assert!(!line.failed(), "{line}");
    assert!(
        line.reason.contains("2 active (1 admin), 1 revoked"),
        "{line}"
    );
    let mut config = config;
    config.gateway.max_live_jobs_per_key = 0;
    let line = access::api_keys(&config, Depth::Startup).await;
    assert!(line.failed() && line.reason.contains("quota"), "{line}");
}

#[test]
fn plain_http_outbound_is_critical_in_production_and_reported_in_dev() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = dev(dir.path());
    assert!(!transit::outbound(&config).failed());
    config.discord.api_base = "http://127.0.0.1:9999/api/v10".into();
    let line = transit::outbound(&config);
    assert_eq!(line.status, Status::Fail { critical: false }, "{line}");
    config.discord.api_base = "http://proxy.example/api/v10".into();
    assert!(transit::outbound(&config).is_critical());
    config.profile = Profile::Production;
    config.discord.api_base = "http://127.0.0.1:9999/api/v10".into();
    assert!(transit::outbound(&config).is_critical());
}

#[test]
fn the_dev_profile_facing_a_network_fails_and_open_data_directories_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = dev(dir.path());
    assert!(!access::profile(&config).failed());
    config.listen = "0.0.0.0:8443".parse().expect("addr");
    let line = access::profile(&config);
    assert!(
        line.failed() && line.reason.contains("production"),
        "{line}"
    );
    config.profile = Profile::Production;
    assert!(!access::profile(&config).failed());

    config.prepare_data_dir().expect("data dir");
    assert!(!at_rest::images(&config).failed());
    chmod(&config.data_dir, 0o755);
    let line = at_rest::images(&config);
    assert!(line.failed() && line.reason.contains("755"), "{line}");
    config.profile = Profile::Production;
    config.tls = Default::default();
    assert!(transit::tls(&config).is_critical());

    assert!(!access::limits(&config).failed());
    config.gateway.per_ip_requests_per_sec = 0;
    let line = access::limits(&config);
    assert!(line.failed() && !line.is_critical(), "{line}");
}

#[tokio::test]
async fn a_worker_listener_off_the_workers_network_fails_the_audit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = production(dir.path());
    assert!(!access::workers(&config).failed(), "none configured");
    config.worker_listen = Some("10.0.0.5:8444".parse().expect("addr"));
    assert!(!access::workers(&config).failed(), "a private network");
    for public in ["0.0.0.0:8444", "203.0.113.7:8444"] {
        config.worker_listen = Some(public.parse().expect("addr"));
        let line = access::workers(&config);
        assert!(line.failed() && !line.is_critical(), "{line}");
    }
    let report = gather(&config, Depth::Startup).await;
    assert!(check(&report, "worker-listener").failed());
}
