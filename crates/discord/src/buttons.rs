//! Buttons on Sparkle's messages. A button's `custom_id` carries the action and the job and
//! is signed with HMAC-SHA256 under a key of the deployment, so a click needs no server-side
//! state (it works after restarts and on any gateway) and nobody can forge a button for a
//! job that is not theirs to touch.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use zeroize::Zeroizing;

/// What a button does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ButtonAction {
    /// The same request with a new seed.
    Reroll,
    /// Four images with new seeds.
    Variations,
    /// Cancel the job while it is queued or running.
    Cancel,
}

impl ButtonAction {
    fn tag(self) -> &'static str {
        match self {
            ButtonAction::Reroll => "r",
            ButtonAction::Variations => "v",
            ButtonAction::Cancel => "c",
        }
    }

    fn from_tag(tag: &str) -> Option<Self> {
        match tag {
            "r" => Some(ButtonAction::Reroll),
            "v" => Some(ButtonAction::Variations),
            "c" => Some(ButtonAction::Cancel),
            _ => None,
        }
    }
}

/// Signs and checks button ids.
pub struct ButtonSigner {
    /// The keyed MAC, ready to clone for each id.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for ButtonSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ButtonSigner(<key redacted>)")
    }
}

/// Bytes of the MAC kept in an id: 128 bits, well inside Discord's 100-character limit.
const MAC_BYTES: usize = 16;

impl ButtonSigner {
    pub fn new(key: &[u8]) -> Result<Self, String> {
        if key.len() < 32 {
            return Err("the button key must be at least 32 bytes".into());
        }
        let key = Zeroizing::new(key.to_vec());
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(&key).map_err(|e| e.to_string())?;
        Ok(ButtonSigner { keyed })
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(payload.as_bytes());
        mac
    }

    /// `tag:job:mac`.
    pub fn sign(&self, action: ButtonAction, job: &str) -> String {
        let payload = format!("{}:{job}", action.tag());
        let tag = self.mac(&payload).finalize().into_bytes();
        format!("{payload}:{}", URL_SAFE_NO_PAD.encode(&tag[..MAC_BYTES]))
    }

    /// The action and job of a genuine id; `None` for anything forged or malformed.
    pub fn verify(&self, custom_id: &str) -> Option<(ButtonAction, String)> {
        let (payload, tag) = custom_id.rsplit_once(':')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if tag.len() != MAC_BYTES {
            return None;
        }
        self.mac(payload).verify_truncated_left(&tag).ok()?;
        let (action, job) = payload.split_once(':')?;
        Some((ButtonAction::from_tag(action)?, job.to_string()))
    }

    /// The action row shown under a finished image.
    pub fn result_buttons(&self, job: &str) -> Value {
        json!([{ "type": 1, "components": [
            { "type": 2, "style": 2, "label": "Re-roll", "custom_id": self.sign(ButtonAction::Reroll, job) },
            { "type": 2, "style": 2, "label": "Variations", "custom_id": self.sign(ButtonAction::Variations, job) },
        ]}])
    }

    /// The action row shown while a job waits or runs.
    pub fn cancel_button(&self, job: &str) -> Value {
        json!([{ "type": 1, "components": [
            { "type": 2, "style": 4, "label": "Cancel", "custom_id": self.sign(ButtonAction::Cancel, job) },
        ]}])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_ids_round_trip_and_forgeries_fail() {
        let signer = ButtonSigner::new(&[3u8; 32]).expect("key");
        let job = "0d6f1f4e-7f0c-4b8e-9a55-1f0f7c5d2a11";
        for action in [
            ButtonAction::Reroll,
            ButtonAction::Variations,
            ButtonAction::Cancel,
        ] {
            let id = signer.sign(action, job);
            assert!(id.len() <= 100, "{id}");
            assert_eq!(signer.verify(&id), Some((action, job.to_string())));
        }
        let id = signer.sign(ButtonAction::Reroll, job);
        let other_job = id.replace("0d6f", "1d6f");
        let other_action = format!("c{}", &id[1..]);
        let other_key = ButtonSigner::new(&[4u8; 32]).expect("key");
        for forged in [
            other_job.as_str(),
            other_action.as_str(),
            "r:x:",
            "",
            "nonsense",
            &id[..id.len() - 2],
        ] {
            assert_eq!(signer.verify(forged), None, "{forged}");
        }
        assert_eq!(other_key.verify(&id), None);
        assert!(ButtonSigner::new(&[1u8; 8]).is_err());
        assert!(!format!("{signer:?}").contains('3'));
    }
}
