//! The keyring file's text, one key a line:
//!
//! ```text
//! sparkle-keyring 1
//! index HEX                       the blind-index key (never rotated)
//! key ID CREATED active HEX       the master key new values are sealed under
//! key ID CREATED live HEX         older master keys, still opening what they sealed
//! key ID CREATED retired:WHEN -   retired: the material is gone
//! ```
//!
//! Errors name the line number, never a line's contents.

use crate::{KeyMaterial, Keyring, MasterKey, MasterKeyId};
use std::fmt::Write as _;
use zeroize::Zeroizing;

const FORMAT: &str = "sparkle-keyring 1";

/// Parses the keyring text; errors say which line, never what it holds.
pub fn parse(text: &str) -> Result<Keyring, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(n, line)| (n + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    match lines.next() {
        Some((_, FORMAT)) => {}
        _ => return Err(format!("the first line must be `{FORMAT}`")),
    }
    let mut index = None;
    let mut active = None;
    let mut keys = Vec::new();
    for (n, line) in lines {
        let bad = |what: &str| format!("line {n}: {what}");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["index", material] => {
                if index.is_some() {
                    return Err(bad("a second index key"));
                }
                index = Some(KeyMaterial::from_hex(material).map_err(|e| bad(&e.to_string()))?);
            }
            ["key", id, created, state, material] => {
                let id = MasterKeyId::new(id).map_err(|e| bad(&e.to_string()))?;
                let created: i64 = created.parse().map_err(|_| bad("bad creation time"))?;
                let key = if let Some(when) = state.strip_prefix("retired:") {
                    let when = when.parse().map_err(|_| bad("bad retirement time"))?;
                    if *material != "-" {
                        return Err(bad("a retired key keeps no material"));
                    }
                    MasterKey::retired(id, created, when)
                } else {
                    let material =
                        KeyMaterial::from_hex(material).map_err(|e| bad(&e.to_string()))?;
                    match *state {
                        "active" if active.is_some() => return Err(bad("a second active key")),
                        "active" => active = Some(id.clone()),
                        "live" => {}
                        _ => return Err(bad("the state is active, live or retired:WHEN")),
                    }
                    MasterKey::live(id, created, material)
                };
                keys.push(key);
            }
            _ => return Err(bad("expected `index HEX` or `key ID CREATED STATE HEX`")),
        }
    }
    let index = index.ok_or("no index key")?;
    let active = active.ok_or("no active key")?;
    Keyring::from_parts(keys, active, index).map_err(|e| e.to_string())
}

/// The keyring as text, for the file only.
pub fn format(ring: &Keyring) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::new());
    let _ = writeln!(
        text,
        "# Sparkle's master keys: they seal the images and database fields at rest.\n\
         # Keep this file secret (mode 0600) and backed up: without it nothing sealed can be\n\
         # read. Change it with `sparkle keyring`, not by hand.\n{FORMAT}\nindex {}",
        ring.index_key().to_hex().as_str()
    );
    for key in ring.keys() {
        let (state, material) = match (key.retired_at, key.material()) {
            (None, Some(m)) if &key.id == ring.active_id() => ("active".to_string(), Some(m)),
            (None, Some(m)) => ("live".to_string(), Some(m)),
            (retired, _) => (
                format!("retired:{}", retired.unwrap_or(key.created_at)),
                None,
            ),
        };
        let material = material.map(|m| m.to_hex());
        let _ = writeln!(
            text,
            "key {} {} {state} {}",
            key.id,
            key.created_at,
            material.as_ref().map_or("-", |m| m.as_str())
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_round_trips_and_errors_never_quote_it() {
        let mut ring = Keyring::generate(100);
        let first = ring.active_id().clone();
        ring.rotate(200);
        let third = ring.rotate(300);
        ring.retire(&first, 400).expect("retire");
        let text = format(&ring);
        let back = parse(&text).expect("parse");
        assert_eq!(back.active_id(), &third);
        assert_eq!(format(&back).as_str(), text.as_str());
        assert_eq!(back.keys()[0].retired_at, Some(400));
        assert!(back.keys()[0].material().is_none());

        let secret = ring.index_key().to_hex();
        let broken = text.replace(
            &format!("index {}", secret.as_str()),
            &format!("index {}x", &secret[..63]),
        );
        let err = parse(&broken).expect_err("bad hex");
        assert!(
            err.contains("line") && !err.contains(&secret[..63]),
            "{err}"
        );
        let err = parse(&text.replace("live", "lively")).expect_err("bad state");
        assert!(!err.contains(&secret[..8]), "{err}");
        assert!(parse("").is_err());
        let two_active = text.replace(" live ", " active ");
        assert!(parse(&two_active).is_err());
    }
}
