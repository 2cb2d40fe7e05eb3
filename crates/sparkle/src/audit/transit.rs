//! In transit: the listener's TLS, its certificate, and every connection Sparkle opens.

use super::{Check, Depth};
use crate::config::{Config, Profile};
use sparkle_gateway::tls;

/// Days a certificate must still be valid for; fewer is a failure (renew it).
pub const CERTIFICATE_MIN_DAYS: i64 = 14;

fn versions() -> String {
    let names: Vec<String> = tls::PROTOCOL_VERSIONS
        .iter()
        .map(|v| match v.version {
            rustls::ProtocolVersion::TLSv1_3 => "1.3".to_string(),
            rustls::ProtocolVersion::TLSv1_2 => "1.2".to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    format!(
        "TLS {} preferred, {} minimum",
        names.first().map_or("?", String::as_str),
        names.last().map_or("?", String::as_str)
    )
}

/// TLS mode and protocol versions of the public listener.
pub fn tls(config: &Config) -> Check {
    const NAME: &str = "tls";
    let versions = versions();
    match (&config.tls.cert_file, config.profile) {
        (Some(_), _) => Check::pass(
            NAME,
            format!(
                "rustls only, {versions}, HTTP/1.1; certificate and key from files, re-read within {} s of a change",
                config.tls.reload_secs.max(1)
            ),
        ),
        (None, Profile::Dev) => Check::pass(
            NAME,
            format!("rustls only, {versions}, HTTP/1.1; self-signed certificate (dev profile)"),
        ),
        (None, Profile::Production) => Check::critical(
            NAME,
            "no tls.cert_file/tls.key_file: the production profile needs a real certificate",
        ),
    }
}

/// The certificate the listener serves: readable, matching its key, valid now and for more
/// than [`CERTIFICATE_MIN_DAYS`].
pub fn certificate(config: &Config, now: i64) -> Check {
    const NAME: &str = "certificate";
    let (cert, key, self_signed) = config.certificate_files();
    if self_signed && !cert.exists() {
        return Check::pass(
            NAME,
            format!(
                "none yet: the first start makes a self-signed one in {}",
                cert.parent().unwrap_or(&cert).display()
            ),
        );
    }
    let info = match tls::describe(&cert) {
        Ok(info) => info,
        Err(why) => return Check::critical(NAME, why),
    };
    if let Err(why) = tls::load_pair(&cert, &key) {
        return Check::critical(NAME, why);
    }
    let days_left = (info.not_after - now).div_euclid(86_400);
    let until = crate::cmd::keyring::utc(info.not_after);
    let names = if info.names.is_empty() {
        "no subject alternative names".to_string()
    } else {
        info.names.join(", ")
    };
    let what = format!(
        "{} for {names}{}",
        cert.display(),
        if info.self_signed {
            ", self-signed"
        } else {
            ""
        }
    );
    if info.not_before > now {
        return Check::critical(
            NAME,
            format!(
                "{what}: not valid before {}",
                crate::cmd::keyring::utc(info.not_before)
            ),
        );
    }
    if info.not_after <= now {
        return Check::critical(NAME, format!("{what}: expired {until}"));
    }
    if info.names.is_empty() {
        return Check::fail(
            NAME,
            format!("{what}: clients check names against the subject alternative names"),
        );
    }
    if days_left < CERTIFICATE_MIN_DAYS {
        return Check::fail(
            NAME,
            format!("{what}: {days_left} days left (until {until}), fewer than {CERTIFICATE_MIN_DAYS}; renew it"),
        );
    }
    if info.self_signed && config.profile == Profile::Production {
        return Check::fail(
            NAME,
            format!("{what}: self-signed; clients cannot verify it without being given it"),
        );
    }
    Check::pass(
        NAME,
        format!("{what}; key matches; {days_left} days left (until {until})"),
    )
}

/// TLS to the metadata database: verified against the configured CA, and the server's
/// certificate (names, expiry) as it presents it.
pub async fn database(config: &Config, depth: Depth, now: i64) -> Check {
    const NAME: &str = "database-tls";
    let Some(options) = crate::cmd::postgres_options(config, false) else {
        return Check::not_applicable(NAME, "SQLite on local disk");
    };
    let url = match sparkle_queue::DatabaseUrl::parse(&options.url) {
        Ok(url) => url,
        Err(e) => return Check::critical(NAME, e.to_string()),
    };
    let hosts = url.hosts().join(", ");
    if !url.tls {
        return Check::critical(
            NAME,
            format!("{hosts}: sslmode=disable sends queries and the password in the clear"),
        );
    }
    let Some(ca) = options.ca_file.clone().or(url.ca_file.clone()) else {
        return Check::critical(
            NAME,
            format!("{hosts}: no database.ca_file to verify the server against"),
        );
    };
    let rule = format!(
        "{hosts}: TLS, the server verified against {} (name and chain)",
        ca.display()
    );
    if depth == Depth::Startup {
        return Check::pass(NAME, rule);
    }
    let chain = match sparkle_queue::server_certificates(&options).await {
        Ok(chain) => chain,
        Err(e) => return Check::fail(NAME, format!("{rule}; cannot verify it now: {e}")),
    };
    let Some(info) = chain.first().and_then(|der| tls::describe_der(der).ok()) else {
        return Check::fail(
            NAME,
            format!("{rule}; the server presented no readable certificate"),
        );
    };
    let days_left = (info.not_after - now).div_euclid(86_400);
    let what = format!(
        "{rule}; its certificate is for {} until {}",
        info.names.join(", "),
        crate::cmd::keyring::utc(info.not_after)
    );
    if days_left < CERTIFICATE_MIN_DAYS {
        return Check::fail(
            NAME,
            format!("{what}: {days_left} days left, fewer than {CERTIFICATE_MIN_DAYS}; renew it"),
        );
    }
    Check::pass(NAME, format!("{what} ({days_left} days left)"))
}

/// The role the service connects to the database as: it should read and write rows, never
/// change the schema or other roles (migrations run as the owner: `sparkle migrate`).
pub async fn database_role(config: &Config, depth: Depth) -> Check {
    const NAME: &str = "database-role";
    let Some(options) = crate::cmd::postgres_options(config, false) else {
        return Check::not_applicable(NAME, "SQLite on local disk, owned by the service's user");
    };
    if depth == Depth::Startup {
        return Check::not_applicable(NAME, "checked by `sparkle audit`");
    }
    let role = match sparkle_queue::PgQueue::describe(&options).await {
        Ok(role) => role,
        Err(e) => return Check::fail(NAME, format!("cannot ask the database: {e}")),
    };
    let mut powers = Vec::new();
    for (held, what) in [
        (role.superuser, "is a superuser"),
        (role.owns_tables, "owns the tables"),
        (role.may_change_schema, "may create objects in the schema"),
        (role.may_create_roles, "may create roles"),
        (role.may_create_databases, "may create databases"),
    ] {
        if held {
            powers.push(what);
        }
    }
    let who = format!(
        "connects as {} (PostgreSQL {})",
        role.role, role.server_version
    );
    if powers.is_empty() {
        Check::pass(NAME, format!("{who}: reads and writes rows only"))
    } else {
        Check::fail(
            NAME,
            format!(
                "{who}, which {}: connect as a role that may only read and write rows",
                powers.join(", ")
            ),
        )
    }
}

/// Whether `url` is `http://` to this machine.
fn plain_to_loopback(url: &str) -> Option<bool> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    Some(
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
    )
}

/// Connections Sparkle opens: every one verifies the server's certificate.
pub fn outbound(config: &Config) -> Check {
    const NAME: &str = "outbound-tls";
    let base = config.discord.api_base.as_str();
    if base.starts_with("https://") {
        return Check::pass(
            NAME,
            format!("Discord at {base}: certificate verified (webpki roots), TLS 1.2 minimum; the image store is the local disk"),
        );
    }
    match (plain_to_loopback(base), config.profile) {
        (Some(true), Profile::Dev) => Check::fail(
            NAME,
            format!("discord.api_base {base} is plain http (to this machine; the dev profile allows it)"),
        ),
        (Some(_), _) => Check::critical(
            NAME,
            format!("discord.api_base {base} is plain http: tokens and images would cross the network unencrypted"),
        ),
        (None, _) => Check::critical(NAME, format!("discord.api_base {base} is not an https:// URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_told_apart_by_host() {
        assert_eq!(plain_to_loopback("http://127.0.0.1:9/api"), Some(true));
        assert_eq!(plain_to_loopback("http://[::1]:9/api"), Some(true));
        assert_eq!(plain_to_loopback("http://localhost/api"), Some(true));
        assert_eq!(plain_to_loopback("http://discord.example/api"), Some(false));
        assert_eq!(plain_to_loopback("http://127.0.0.1.example/"), Some(false));
        assert_eq!(plain_to_loopback("https://127.0.0.1/"), None);
    }
}
