//! Worker tokens: what a worker presents on the worker protocol, obtained with its
//! enrollment secret and living minutes (15 by default), so that a revoked enrollment stops
//! its workers at their next renewal and a leaked token is soon worthless.
//!
//! A token is `swt1.{enrollment}.{expires}.{key id}.{sig}`: `sig` is unpadded URL-safe
//! base64 of HMAC-SHA256 over the enrollment id, the expiry (unix seconds) and the key id,
//! each framed by its length, under a key derived from the master key it names. Any control
//! plane holding the keyring checks it; nothing is stored per token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::Mac;
use sparkle_seal::{MasterKeyId, MasterKeys};
use std::sync::Arc;
use std::time::Duration;

/// How long a worker token lives unless configured otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(15 * 60);

const INFO: &[u8] = b"sparkle worker token v1";
const PREFIX: &str = "swt1";

/// Issues and checks worker tokens with the keyring's master keys.
pub struct WorkerTokens {
    keys: Arc<MasterKeys>,
    lifetime: Duration,
}

impl std::fmt::Debug for WorkerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerTokens")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkerTokenRefusal {
    #[error("the worker token is malformed")]
    Malformed,
    #[error("the worker token is not genuine")]
    Altered,
    #[error("the worker token was signed with a key that has been retired")]
    UnknownKey,
    #[error("the worker token has expired; renew it with the enrollment secret")]
    Expired,
}

impl WorkerTokens {
    pub fn new(keys: Arc<MasterKeys>, lifetime: Duration) -> WorkerTokens {
        WorkerTokens { keys, lifetime }
    }

    /// A token for `enrollment`, expiring one lifetime after `now_secs`; and that expiry.
    pub fn issue(&self, enrollment: &str, now_secs: i64) -> (String, i64) {
        let (id, mut mac) = self.keys.active_mac(INFO);
        let expires_at =
            now_secs.saturating_add(i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX));
        frame(&mut mac, enrollment, expires_at, &id);
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        (
            format!("{PREFIX}.{enrollment}.{expires_at}.{id}.{sig}"),
            expires_at,
        )
    }

    /// The enrollment a genuine, live token was issued to. The signature is checked first
    /// (in constant time), so only a genuine token is ever said to have expired.
    pub fn verify(&self, token: &str, now_secs: i64) -> Result<String, WorkerTokenRefusal> {
        let mut parts = token.split('.');
        let (Some(PREFIX), Some(enrollment), Some(expires), Some(key), Some(sig), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(WorkerTokenRefusal::Malformed);
        };
        let canonical = !expires.is_empty()
            && expires.len() <= 19
            && expires.bytes().all(|b| b.is_ascii_digit())
            && !expires.starts_with('0');
        let expires_at: i64 = match canonical.then(|| expires.parse().ok()).flatten() {
            Some(at) => at,
            None => return Err(WorkerTokenRefusal::Malformed),
        };
        let id = MasterKeyId::new(key).map_err(|_| WorkerTokenRefusal::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| WorkerTokenRefusal::Malformed)?;
        let mut mac = self
            .keys
            .mac_under(&id, INFO)
            .ok_or(WorkerTokenRefusal::UnknownKey)?;
        frame(&mut mac, enrollment, expires_at, &id);
        mac.verify_slice(&sig)
            .map_err(|_| WorkerTokenRefusal::Altered)?;
        if now_secs >= expires_at {
            return Err(WorkerTokenRefusal::Expired);
        }
        Ok(enrollment.to_string())
    }
}

fn frame(mac: &mut hmac::Hmac<sha2::Sha256>, enrollment: &str, expires_at: i64, id: &MasterKeyId) {
    mac.update(&(enrollment.len() as u32).to_be_bytes());
    mac.update(enrollment.as_bytes());
    mac.update(&expires_at.to_be_bytes());
    mac.update(&(id.as_str().len() as u32).to_be_bytes());
    mac.update(id.as_str().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkle_seal::Keyring;

    fn tokens() -> (WorkerTokens, Arc<MasterKeys>) {
        let keys = Arc::new(MasterKeys::fixed(Keyring::generate(0)));
        (WorkerTokens::new(keys.clone(), DEFAULT_LIFETIME), keys)
    }

    #[test]
    fn a_token_names_its_enrollment_until_it_expires() {
        let (tokens, _) = tokens();
        let (token, expires_at) = tokens.issue("enr_1", 1_000);
        assert_eq!(expires_at, 1_000 + 900);
        assert_eq!(tokens.verify(&token, 1_899).as_deref(), Ok("enr_1"));
        assert_eq!(
            tokens.verify(&token, 1_900),
            Err(WorkerTokenRefusal::Expired)
        );
    }

    #[test]
    fn an_altered_token_is_refused_before_its_expiry_is_read() {
        let (tokens, _) = tokens();
        let (token, _) = tokens.issue("enr_1", 1_000);
        let other = token.replacen("enr_1", "enr_2", 1);
        assert_eq!(
            tokens.verify(&other, 1_001),
            Err(WorkerTokenRefusal::Altered)
        );
        let later = token.replacen(".1900.", ".9900.", 1);
        assert_eq!(
            tokens.verify(&later, 9_000),
            Err(WorkerTokenRefusal::Altered)
        );
        for bad in [
            "",
            "swt1",
            "swt1.a.b.c.d",
            "swt2.enr_1.1900.k.sig",
            &format!("{token}.x"),
        ] {
            assert_eq!(
                tokens.verify(bad, 1_001),
                Err(WorkerTokenRefusal::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_token_of_another_keyring_is_not_genuine() {
        let (tokens, _) = tokens();
        let (theirs, _) = self::tokens();
        let (token, _) = theirs.issue("enr_1", 1_000);
        assert!(tokens.verify(&token, 1_001).is_err());
    }
}
