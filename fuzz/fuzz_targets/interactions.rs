//! Everything Discord's interactions endpoint does with bytes from the network, before any of
//! it reaches the queue: the Ed25519 signature check, the interaction's JSON, and the signed
//! ids of buttons.
//!
//! An input is a request body, optionally followed by a NUL byte and a scenario: the bytes
//! after the last NUL are read with `arbitrary` as a [`Scenario`] (clock, headers, tampering,
//! button ids). A body without a NUL gets the empty scenario: a request signed with the
//! application's key, sent now. JSON never holds a raw NUL, so every seed can be a plain
//! interaction body.
//!
//! What must hold, for every input:
//! - `Verifier::verify` returns exactly what an independent reading of Discord's rules says.
//!   The signature is accepted only if it is the key's own (deterministic, RFC 8032) signature
//!   of the timestamp header followed by the body, so tampering with any of the three bytes is
//!   always refused; then the timestamp must be a Unix time within the window of now.
//! - A body that parses as an `Interaction` agrees with the same body read as plain JSON:
//!   its type, its invoker (the member's user in a server, else the user) and every option
//!   (the first of a name wins; unknown names have none).
//! - A button id verifies only if it is exactly what `ButtonSigner::sign` makes for the action
//!   and job it names; ids signed for any job round-trip; a changed id, or one signed under
//!   another key, is refused.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sparkle_discord::{
    ButtonAction, ButtonSigner, Interaction, InteractionKind, OptionValue, SignatureError,
    Verifier,
};
use std::sync::LazyLock;

/// Seconds a timestamp may be away from now.
const WINDOW_SECS: u32 = 300;
/// "Now" for scenarios that keep a realistic clock.
const BASE_NOW: i64 = 1_790_000_000;
/// The key the seed button id was signed with.
const BUTTON_KEY: [u8; 32] = [3; 32];

struct Keys {
    application: SigningKey,
    stranger: SigningKey,
    verifier: Verifier,
    buttons: ButtonSigner,
    other_buttons: ButtonSigner,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let application = SigningKey::from_bytes(&[7; 32]);
    let public_hex = hex::encode(application.verifying_key().to_bytes());
    Keys {
        verifier: Verifier::new(&public_hex, WINDOW_SECS).expect("a valid public key"),
        application,
        stranger: SigningKey::from_bytes(&[8; 32]),
        buttons: ButtonSigner::new(&BUTTON_KEY).expect("a long enough key"),
        other_buttons: ButtonSigner::new(&[4; 32]).expect("a long enough key"),
    }
});

#[derive(Debug, Arbitrary)]
struct Scenario {
    clock: Clock,
    timestamp: TimestampHeader,
    signature: SignatureHeader,
    tamper: Option<Tamper>,
    /// An option name to look up besides those in the body.
    option_name: String,
    /// A button id from nowhere.
    custom_id: String,
    /// A button to sign, and a change to make to its id.
    action: Action,
    job: String,
    id_change: Option<(u8, char)>,
}

#[derive(Debug, Arbitrary)]
enum Clock {
    /// Seconds from a realistic now.
    Near(i32),
    Anywhere(i64),
}

#[derive(Debug, Arbitrary)]
enum TimestampHeader {
    /// Sent `age` seconds before now (negative: from the future).
    Sent { age: i16 },
    At(i64),
    Text(String),
    Absent,
}

#[derive(Debug, Arbitrary)]
enum SignatureHeader {
    /// Signed with the application's key, hex in either case.
    Genuine { uppercase: bool },
    /// Signed with some other key.
    Stranger,
    Text(String),
    Absent,
}

/// A change made after signing.
#[derive(Debug, Arbitrary)]
enum Tamper {
    Body { at: u16, xor: u8 },
    BodyTruncated { len: u16 },
    BodyExtended(Vec<u8>),
    /// Replaces (or, past the end, appends) one character of the timestamp header.
    Timestamp { at: u8, with: char },
    Signature { at: u8, xor: u8 },
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Action {
    Reroll,
    Variations,
    Cancel,
}

impl From<Action> for ButtonAction {
    fn from(action: Action) -> Self {
        match action {
            Action::Reroll => ButtonAction::Reroll,
            Action::Variations => ButtonAction::Variations,
            Action::Cancel => ButtonAction::Cancel,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (body, scenario) = match data.iter().rposition(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let Ok(scenario) = Scenario::arbitrary(&mut Unstructured::new(scenario)) else {
        return;
    };
    let keys = &*KEYS;
    check_signature(keys, &scenario, body);
    let custom_id = check_interaction(body, &scenario.option_name);
    for id in custom_id.iter().chain([&scenario.custom_id]) {
        check_button_id(keys, id);
    }
    check_button_round_trip(keys, scenario.action.into(), &scenario.job, scenario.id_change);
});

/// The headers and body of one request, made as the scenario says, and the verifier's answer
/// compared with the rules.
fn check_signature(keys: &Keys, scenario: &Scenario, body: &[u8]) {
    let now = match scenario.clock {
        Clock::Near(delta) => BASE_NOW + i64::from(delta),
        Clock::Anywhere(now) => now,
    };
    let mut timestamp = match &scenario.timestamp {
        TimestampHeader::Sent { age } => Some(now.wrapping_sub(i64::from(*age)).to_string()),
        TimestampHeader::At(at) => Some(at.to_string()),
        TimestampHeader::Text(text) => Some(text.clone()),
        TimestampHeader::Absent => None,
    };
    let signed = |key: &SigningKey| {
        let message = message(timestamp.as_deref().unwrap_or_default(), body);
        key.sign(&message).to_bytes()
    };
    let mut signature = match &scenario.signature {
        SignatureHeader::Genuine { uppercase: false } => Some(hex::encode(signed(&keys.application))),
        SignatureHeader::Genuine { uppercase: true } => {
            Some(hex::encode_upper(signed(&keys.application)))
        }
        SignatureHeader::Stranger => Some(hex::encode(signed(&keys.stranger))),
        SignatureHeader::Text(text) => Some(text.clone()),
        SignatureHeader::Absent => None,
    };
    let mut body = body.to_vec();
    match &scenario.tamper {
        None => {}
        Some(Tamper::Body { at, xor }) => {
            if let Some(i) = usize::from(*at).checked_rem(body.len()) {
                body[i] ^= xor;
            }
        }
        Some(Tamper::BodyTruncated { len }) => body.truncate(usize::from(*len)),
        Some(Tamper::BodyExtended(more)) => body.extend_from_slice(more),
        Some(Tamper::Timestamp { at, with }) => {
            if let Some(text) = &mut timestamp {
                let mut chars: Vec<char> = text.chars().collect();
                match chars.get_mut(usize::from(*at)) {
                    Some(c) => *c = *with,
                    None => chars.push(*with),
                }
                *text = chars.into_iter().collect();
            }
        }
        Some(Tamper::Signature { at, xor }) => {
            if let Some(Ok(mut raw)) = signature.as_deref().map(hex::decode) {
                if let Some(i) = usize::from(*at).checked_rem(raw.len()) {
                    raw[i] ^= xor;
                }
                signature = Some(hex::encode(raw));
            }
        }
    }
    let got = keys
        .verifier
        .verify(signature.as_deref(), timestamp.as_deref(), &body, now);
    let want = rules(keys, signature.as_deref(), timestamp.as_deref(), &body, now);
    assert_eq!(
        got, want,
        "signature {signature:?}, timestamp {timestamp:?}, now {now}"
    );
}

/// What Discord signs: the timestamp header's bytes, then the body's.
fn message(timestamp: &str, body: &[u8]) -> Vec<u8> {
    [timestamp.as_bytes(), body].concat()
}

/// The verifier's contract, written out independently. Ed25519 signing is deterministic and
/// only this target holds the application's key, so the one signature that can be genuine is
/// the key's own signature of the message; anything else that passed would be a forgery.
fn rules(
    keys: &Keys,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
        return Err(SignatureError::Missing);
    };
    if signature.len() != 128 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SignatureError::Malformed);
    }
    let genuine = keys.application.sign(&message(timestamp, body)).to_bytes();
    if !signature.eq_ignore_ascii_case(&hex::encode(genuine)) {
        return Err(SignatureError::Invalid);
    }
    let Ok(sent) = timestamp.parse::<i64>() else {
        return Err(SignatureError::BadTimestamp);
    };
    let skew = i128::from(now) - i128::from(sent);
    if skew.abs() > i128::from(WINDOW_SECS) {
        let skew_secs = skew.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        return Err(SignatureError::Stale { skew_secs });
    }
    Ok(())
}

/// Parses the body as the gateway does and checks the typed view against the untyped one.
/// Returns the button id it carries, if any.
fn check_interaction(body: &[u8], extra_option: &str) -> Option<String> {
    let interaction: Interaction = serde_json::from_slice(body).ok()?;
    let json: Value = match serde_json::from_slice(body) {
        Ok(json) => json,
        // serde_json skips the fields Sparkle ignores without checking that their strings are
        // UTF-8, so a body can be an interaction without being JSON. Those bytes must not
        // change what is read; with them replaced, the body is (usually) JSON again.
        Err(_) => {
            let lossy = String::from_utf8_lossy(body);
            let again: Interaction =
                serde_json::from_str(&lossy).expect("only ignored bytes were not UTF-8");
            assert_eq!(format!("{again:?}"), format!("{interaction:?}"));
            match serde_json::from_str(&lossy) {
                Ok(json) => json,
                Err(_) => return interaction.data.and_then(|d| d.custom_id),
            }
        }
    };
    let text = |v: &Value| v.as_str().map(str::to_owned);

    assert_eq!(Some(&interaction.id), text(&json["id"]).as_ref());
    assert_eq!(Some(&interaction.token), text(&json["token"]).as_ref());
    let kind = json["type"].as_u64().and_then(|t| u8::try_from(t).ok());
    assert_eq!(Some(interaction.kind), kind.map(InteractionKind::from));
    assert_eq!(interaction.guild_id, text(&json["guild_id"]));

    let invoker = match &json["member"] {
        Value::Null => &json["user"]["id"],
        member => &member["user"]["id"],
    };
    assert_eq!(
        interaction.invoker().map(|u| u.id.clone()),
        text(invoker),
        "the invoker is the member's user in a server, else the user"
    );

    let options = json["data"]["options"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<&str> = options.iter().filter_map(|o| o["name"].as_str()).collect();
    names.push(extra_option);
    for name in names {
        let first = options.iter().find(|o| o["name"].as_str() == Some(name));
        let want = first.and_then(|o| option_value(&o["value"]));
        assert_eq!(interaction.option(name), want.as_ref(), "option {name:?}");
    }

    let custom_id = interaction.data.as_ref().and_then(|d| d.custom_id.clone());
    assert_eq!(custom_id, text(&json["data"]["custom_id"]));
    custom_id
}

/// An option's value as Discord's types map onto [`OptionValue`]: integers first, then other
/// numbers, booleans and strings.
fn option_value(value: &Value) -> Option<OptionValue> {
    match value {
        Value::Number(n) => Some(match n.as_i64() {
            Some(i) => OptionValue::Integer(i),
            None => OptionValue::Number(n.as_f64()?),
        }),
        Value::Bool(b) => Some(OptionValue::Bool(*b)),
        Value::String(s) => Some(OptionValue::String(s.clone())),
        _ => None,
    }
}

/// Only ids the signer itself made, byte for byte, are accepted.
fn check_button_id(keys: &Keys, custom_id: &str) {
    if let Some((action, job)) = keys.buttons.verify(custom_id) {
        assert_eq!(
            keys.buttons.sign(action, &job),
            custom_id,
            "accepted an id the signer did not make"
        );
    }
    if let Some((action, job)) = keys.other_buttons.verify(custom_id) {
        assert_eq!(keys.other_buttons.sign(action, &job), custom_id);
    }
}

/// Any job round-trips through its id; a changed id or another key is refused.
fn check_button_round_trip(
    keys: &Keys,
    action: ButtonAction,
    job: &str,
    id_change: Option<(u8, char)>,
) {
    let id = keys.buttons.sign(action, job);
    assert_eq!(keys.buttons.verify(&id), Some((action, job.to_owned())));
    assert_eq!(keys.other_buttons.verify(&id), None, "another key accepted {id:?}");
    let Some((at, with)) = id_change else {
        return;
    };
    let mut chars: Vec<char> = id.chars().collect();
    let at = usize::from(at) % chars.len();
    chars[at] = with;
    let changed: String = chars.into_iter().collect();
    if changed != id {
        assert_eq!(keys.buttons.verify(&changed), None, "accepted {changed:?}");
    }
}
