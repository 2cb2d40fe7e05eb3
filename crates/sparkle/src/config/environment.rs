//! `SPARKLE_*` variables as settings, each value exactly as it was written.
//!
//! figment's own `Env` provider guesses a type for every value, so a Discord id such as
//! `123456789012345678` arrives as a number and a text setting refuses it, and `0123` would
//! lose its zero. Here a value stays the text it is; the configuration is then extracted
//! with figment's lossy interpretation, which reads text as a number or a boolean exactly
//! where the setting is one. Only what text alone cannot say is parsed in figment's syntax:
//! a quoted string (`"…"`), an array (`[…]`) or a table (`{…}`), whose items become text too,
//! integers with their exact digits.

use figment::providers::Env;
use figment::value::{Dict, Map, Num, Value};
use figment::{Error, Metadata, Profile, Provider};

/// Variables the engine reads for itself; they are not settings.
const ENGINE_SWITCHES: &[&str] = &["flash_attention", "flash_rows"];

/// The `SPARKLE_*` environment, nested with `__` (`SPARKLE_SCALER__MAX_WORKERS=2` is
/// `scaler.max_workers`).
pub struct Environment {
    env: Env,
}

impl Environment {
    pub fn new() -> Environment {
        Environment {
            env: Env::prefixed("SPARKLE_")
                .ignore(ENGINE_SWITCHES)
                .split("__"),
        }
    }
}

impl Provider for Environment {
    fn metadata(&self) -> Metadata {
        self.env.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let mut settings = Dict::new();
        for (key, text) in self.env.iter() {
            if let Value::Dict(_, nested) = figment::util::nest(key.as_str(), value_of(&text)) {
                merge(&mut settings, nested);
            }
        }
        Ok(Profile::Default.collect(settings))
    }
}

/// The value a variable's text gives: the text itself, or for a quoted string, an array or
/// a table, what it says with every item as text.
fn value_of(text: &str) -> Value {
    let text = text.trim();
    if text.starts_with(['"', '[', '{']) {
        match text.parse::<Value>() {
            Ok(value) => as_text(value),
            Err(never) => match never {},
        }
    } else {
        Value::from(text.to_string())
    }
}

fn as_text(value: Value) -> Value {
    match value {
        Value::Num(tag, num) => Value::String(tag, num_text(num)),
        Value::Bool(tag, b) => Value::String(tag, b.to_string()),
        Value::Char(tag, c) => Value::String(tag, c.to_string()),
        Value::Array(tag, items) => Value::Array(tag, items.into_iter().map(as_text).collect()),
        Value::Dict(tag, dict) => Value::Dict(
            tag,
            dict.into_iter().map(|(k, v)| (k, as_text(v))).collect(),
        ),
        other => other,
    }
}

/// A number's digits: integers exactly, floats in the shortest form that reads back the same.
fn num_text(num: Num) -> String {
    if let Some(n) = num.to_u128() {
        n.to_string()
    } else if let Some(n) = num.to_i128() {
        n.to_string()
    } else {
        num.to_f64().map(|f| f.to_string()).unwrap_or_default()
    }
}

/// `from` laid over `into`, table by table.
fn merge(into: &mut Dict, from: Dict) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Dict(_, inner)), Value::Dict(_, more)) => merge(inner, more),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}
