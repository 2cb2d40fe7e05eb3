//! Who can reach what: secret files, the admin listener, API keys, the profile.

use super::{mode_of, Check, Depth};
use crate::config::{Config, Profile};
use sparkle_queue::Scope;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// The secret files this configuration reads, by the setting that names them.
fn secret_files(config: &Config) -> Vec<(&'static str, PathBuf, bool)> {
    let mut files = Vec::new();
    let (_, key, self_signed) = config.certificate_files();
    if !self_signed || key.exists() {
        files.push(("tls.key_file", key, !self_signed));
    }
    files.push((
        "keyring",
        crate::keyring::path(config),
        config.encryption.keyring_file.is_some(),
    ));
    if let Some(file) = &config.discord.bot_token_file {
        files.push(("discord.bot_token_file", file.clone(), true));
    }
    match &config.discord.button_key_file {
        Some(file) => files.push(("discord.button_key_file", file.clone(), false)),
        None => files.push((
            "discord.button_key_file",
            config.data_dir.join("discord-button.key"),
            false,
        )),
    }
    files
}

/// Every secret comes from a file that only its owner can read.
pub fn secrets(config: &Config) -> Check {
    const NAME: &str = "secrets";
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (setting, path, required) in secret_files(config) {
        match mode_of(&path) {
            None if required => bad.push(format!("{setting} {} is missing", path.display())),
            None => {}
            Some(mode) if mode & 0o077 != 0 => bad.push(format!(
                "{setting} {} is mode {mode:o} (run `chmod 600 {}`)",
                path.display(),
                path.display()
            )),
            Some(mode) => good.push(format!("{setting} ({mode:o})")),
        }
    }
    if !bad.is_empty() {
        return Check::critical(NAME, bad.join("; "));
    }
    let listed = if good.is_empty() {
        "none on disk yet".to_string()
    } else {
        format!("owner-only: {}", good.join(", "))
    };
    Check::pass(NAME, format!("{listed}; no setting takes a secret inline"))
}

/// Whether `ip` belongs to a private network (RFC 1918, unique local, link-local).
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Where a listener can be reached from, in words; `None` when it is public.
fn reach(addr: SocketAddr) -> Result<&'static str, &'static str> {
    let ip = addr.ip();
    if ip.is_loopback() {
        Ok("loopback")
    } else if ip.is_unspecified() {
        Err("every interface")
    } else if is_private(ip) {
        Ok("a private network")
    } else {
        Err("a public address")
    }
}

/// Metrics and admin stay off the public network.
pub fn admin(config: &Config) -> Check {
    const NAME: &str = "admin";
    let addr = config.admin_listen;
    match reach(addr) {
        Ok(where_) => Check::pass(NAME, format!("metrics listen on {addr} ({where_})")),
        Err(where_) => Check::critical(
            NAME,
            format!("metrics listen on {addr} ({where_}); use loopback or a private address"),
        ),
    }
}

/// The worker protocol's listener stays on the workers' network: workers pull work and
/// need no inbound port, and nothing else needs to reach it.
pub fn workers(config: &Config) -> Check {
    const NAME: &str = "worker-listener";
    let lifetime = config.worker.token_lifetime_secs;
    let Some(addr) = config.worker_listen else {
        return Check::pass(
            NAME,
            "no worker_listen: only the local workers of `sparkle up`, over loopback",
        );
    };
    match reach(addr) {
        Ok(where_) => Check::pass(
            NAME,
            format!(
                "the worker protocol listens on {addr} ({where_}); workers enroll with a secret \
                 and hold tokens of {lifetime} s"
            ),
        ),
        Err(where_) => Check::fail(
            NAME,
            format!(
                "the worker protocol listens on {addr} ({where_}); bind worker_listen to the \
                 workers' network only"
            ),
        ),
    }
}

/// Every API route needs a key; keys are stored hashed.
pub async fn api_keys(config: &Config, depth: Depth) -> Check {
    const NAME: &str = "api-keys";
    let g = &config.gateway;
    let mut unlimited = Vec::new();
    if g.per_key_requests_per_sec == 0 {
        unlimited.push("no per-key rate (gateway.per_key_requests_per_sec = 0)");
    }
    if g.max_live_jobs_per_key == 0 {
        unlimited.push("no per-key job quota (gateway.max_live_jobs_per_key = 0)");
    }
    let rule = format!(
        "every /v1 route needs `Authorization: Bearer` with a scoped key (Discord: a signed request; one image: a signed link); per key {}/s (burst {}) and {} queued or running jobs",
        g.per_key_requests_per_sec, g.per_key_burst, g.max_live_jobs_per_key
    );
    let verdict = |text: String| {
        if unlimited.is_empty() {
            Check::pass(NAME, text)
        } else {
            Check::fail(NAME, format!("{text}; {}", unlimited.join(", ")))
        }
    };
    if depth == Depth::Startup || !config.database_exists() {
        return verdict(format!("{rule}; keys stored as SHA-256 hashes, shown once"));
    }
    let keys = async {
        let ring = crate::keyring::read(&crate::keyring::path(config))?;
        let queue = crate::cmd::open_queue_read_only(
            config,
            std::sync::Arc::new(sparkle_seal::MasterKeys::fixed(ring)),
        )
        .await?;
        anyhow::Ok(queue.list_keys().await?)
    }
    .await;
    match keys {
        Ok(keys) => {
            let active: Vec<_> = keys.iter().filter(|k| !k.revoked).collect();
            let admins = active
                .iter()
                .filter(|k| k.scopes.contains(&Scope::Admin))
                .count();
            verdict(format!(
                "{rule}; {} active ({admins} admin), {} revoked, stored as SHA-256 hashes",
                active.len(),
                keys.len() - active.len()
            ))
        }
        Err(e) => Check::fail(NAME, format!("{rule}; cannot list the keys: {e:#}")),
    }
}

/// The dev profile is for one machine: it must not face a network.
pub fn profile(config: &Config) -> Check {
    const NAME: &str = "profile";
    match config.profile {
        Profile::Production => Check::pass(NAME, "production"),
        Profile::Dev => match reach(config.listen) {
            Ok("loopback") => Check::pass(NAME, format!("dev, listening on {} (loopback) only", config.listen)),
            _ => Check::fail(
                NAME,
                format!(
                    "dev profile listening on {}, beyond this machine: use profile = \"production\"",
                    config.listen
                ),
            ),
        },
    }
}

/// Limits against abuse are on.
pub fn limits(config: &Config) -> Check {
    const NAME: &str = "limits";
    let g = &config.gateway;
    let kib = |n: usize| format!("{} KiB", n / 1024);
    let mut text = format!(
        "body {}, headers {}, prompt {} chars; handshake {} s, headers and idle {} s, request {} s, unread answer {} s; {} connections, {} per address",
        kib(g.max_body_bytes),
        kib(g.max_header_bytes),
        config.limits.max_prompt_chars,
        g.handshake_timeout_secs,
        g.header_timeout_secs,
        g.request_timeout_secs,
        g.send_timeout_secs,
        g.max_connections,
        g.max_connections_per_ip,
    );
    if g.per_ip_requests_per_sec == 0 {
        text.push_str("; no per-address rate limit (gateway.per_ip_requests_per_sec = 0)");
        return Check::fail(NAME, text);
    }
    text.push_str(&format!(
        "; {}/s per address (burst {}) before authentication",
        g.per_ip_requests_per_sec, g.per_ip_burst
    ));
    Check::pass(NAME, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_placed_by_address() {
        let at = |s: &str| reach(s.parse().expect("addr"));
        assert_eq!(at("127.0.0.1:1"), Ok("loopback"));
        assert_eq!(at("[::1]:1"), Ok("loopback"));
        assert_eq!(at("10.1.2.3:1"), Ok("a private network"));
        assert_eq!(at("192.168.0.9:1"), Ok("a private network"));
        assert_eq!(at("[fd00::1]:1"), Ok("a private network"));
        assert_eq!(at("0.0.0.0:1"), Err("every interface"));
        assert_eq!(at("[::]:1"), Err("every interface"));
        assert_eq!(at("8.8.8.8:1"), Err("a public address"));
        assert_eq!(at("[2001:db8::1]:1"), Err("a public address"));
    }
}
