//! At rest: the keyring that seals images and database fields, and where images live.

use super::{mode_of, Check, Depth};
use crate::config::{Config, Profile};
use sparkle_seal::{Keyring, MasterKeys};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Whether `path` lies inside `dir` (both resolved, symbolic links followed).
fn inside(path: &std::path::Path, dir: &std::path::Path) -> bool {
    let resolve =
        |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    resolve(path).starts_with(resolve(dir))
}

/// Encryption at rest on, the keyring sound, and (at [`Depth::Full`]) everything stored
/// sealed under a key the keyring still holds.
pub async fn encryption(config: &Config, depth: Depth) -> Check {
    const NAME: &str = "encryption";
    let path = crate::keyring::path(config);
    if !path.exists() {
        if config.profile == Profile::Dev && config.encryption.keyring_file.is_none() {
            return Check::pass(
                NAME,
                format!(
                    "images and database fields sealed (AES-256-GCM); no keyring yet: the first start makes {}",
                    path.display()
                ),
            );
        }
        return Check::critical(
            NAME,
            format!(
                "no keyring at {}; make one with `sparkle keyring rotate` and back it up",
                path.display()
            ),
        );
    }
    if config.profile == Profile::Production && inside(&path, &config.data_dir) {
        return Check::critical(
            NAME,
            format!(
                "the keyring {} lives in the data directory it protects: a backup or copy of \
                 the directory carries its own keys. Move it elsewhere (a secrets mount) and \
                 set encryption.keyring_file",
                path.display()
            ),
        );
    }
    let ring = match crate::keyring::read(&path) {
        Ok(ring) => ring,
        Err(e) => return Check::critical(NAME, format!("{e:#}")),
    };
    let keys = describe_keys(&ring);
    if depth == Depth::Startup {
        return Check::pass(
            NAME,
            format!("images and database fields sealed (AES-256-GCM); {keys}"),
        );
    }
    let usable = |id: &str| {
        ring.keys()
            .iter()
            .any(|k| k.id.as_str() == id && k.material().is_some())
    };
    let mut problems = Vec::new();
    let mut stored = Vec::new();
    match images_by_key(config, &ring).await {
        Ok((by_key, unsealed)) => {
            let lost: Vec<&String> = by_key.keys().filter(|id| !usable(id)).collect();
            let count: u64 = by_key.values().sum();
            stored.push(format!("{count} image(s)"));
            if unsealed > 0 {
                problems.push(format!(
                    "{unsealed} image(s) not sealed (run `sparkle keyring rotate`)"
                ));
            }
            if !lost.is_empty() {
                problems.push(format!("images under keys the keyring lacks: {lost:?}"));
            }
        }
        Err(e) => problems.push(format!("cannot read the images: {e:#}")),
    }
    if config.database_exists() {
        match fields_by_key(config, &ring).await {
            Ok((by_key, unsealed)) => {
                let lost: Vec<&String> = by_key.keys().filter(|id| !usable(id)).collect();
                let count: u64 = by_key.values().sum();
                stored.push(format!("{count} database field(s)"));
                if unsealed > 0 {
                    problems.push(format!(
                        "{unsealed} database field(s) not sealed (the next start seals them)"
                    ));
                }
                if !lost.is_empty() {
                    problems.push(format!(
                        "database fields under keys the keyring lacks: {lost:?}"
                    ));
                }
            }
            Err(e) => problems.push(format!("cannot read the database: {e:#}")),
        }
    }
    if problems.is_empty() {
        let stored = if stored.iter().all(|s| s.starts_with("0 ")) {
            "nothing stored yet".to_string()
        } else {
            format!("{} sealed under them", stored.join(" and "))
        };
        Check::pass(
            NAME,
            format!("images and database fields sealed (AES-256-GCM); {keys}; {stored}"),
        )
    } else {
        Check::fail(NAME, format!("{keys}; {}", problems.join("; ")))
    }
}

fn describe_keys(ring: &Keyring) -> String {
    let mut live = Vec::new();
    let mut retired = 0;
    for key in ring.keys() {
        if &key.id == ring.active_id() {
            continue;
        }
        match key.retired_at {
            Some(_) => retired += 1,
            None => live.push(key.id.to_string()),
        }
    }
    let mut text = format!("active key {}", ring.active_id());
    if !live.is_empty() {
        text.push_str(&format!(", live {}", live.join(" ")));
    }
    if retired > 0 {
        text.push_str(&format!(", {retired} retired"));
    }
    text
}

async fn images_by_key(
    config: &Config,
    ring: &Keyring,
) -> anyhow::Result<(BTreeMap<String, u64>, u64)> {
    if config.store.url.is_none() && !config.images_dir().exists() {
        return Ok((BTreeMap::new(), 0));
    }
    let store = crate::cmd::open_store(config, Arc::new(MasterKeys::fixed(ring.clone())))?;
    let usage = store.key_usage().await?;
    let by_key = usage
        .by_key
        .into_iter()
        .map(|(id, n)| (id.to_string(), n))
        .collect();
    Ok((by_key, usage.unsealed))
}

async fn fields_by_key(
    config: &Config,
    ring: &Keyring,
) -> anyhow::Result<(BTreeMap<String, u64>, u64)> {
    let queue =
        crate::cmd::open_queue_read_only(config, Arc::new(MasterKeys::fixed(ring.clone()))).await?;
    let usage = queue.field_key_usage().await?;
    Ok((usage.by_key, usage.unsealed))
}

/// Images are reachable only through the API: no route serves them by path, and the data
/// directory that holds them is the service user's alone.
pub fn images(config: &Config) -> Check {
    const NAME: &str = "images";
    let how = format!(
        "served only by /v1/jobs/{{id}}/images/{{n}} to the key that made them (or an admin key) or to a signed link, for {} s",
        config.gateway.image_link_secs
    );
    let mut open = Vec::new();
    for dir in [config.data_dir.clone(), config.images_dir()] {
        if let Some(mode) = mode_of(&dir) {
            if mode & 0o077 != 0 {
                open.push(format!("{} (mode {mode:o})", dir.display()));
            }
        }
    }
    if !open.is_empty() {
        return Check::fail(
            NAME,
            format!(
                "{how}, but other users can enter {}; the next start restricts the data directory",
                open.join(", ")
            ),
        );
    }
    let where_ = match mode_of(&config.data_dir) {
        Some(mode) => format!("{} (mode {mode:o})", config.data_dir.display()),
        None => format!(
            "{} (made owner-only on first start)",
            config.data_dir.display()
        ),
    };
    Check::pass(NAME, format!("{how}; sealed on disk under {where_}"))
}
