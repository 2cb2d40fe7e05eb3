use ed25519_dalek::{Signature, VerifyingKey};

/// Why a request was refused. Every variant is answered with 401; the variants exist for
/// logs and tests, never for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the X-Signature-Ed25519 or X-Signature-Timestamp header is missing")]
    Missing,
    #[error("the signature is not 64 bytes of hex")]
    Malformed,
    #[error("the timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error("the timestamp is {skew_secs} s away from now, outside the window")]
    Stale { skew_secs: i64 },
    #[error("the signature does not match")]
    Invalid,
}

/// Checks requests against the application's public key.
#[derive(Debug, Clone)]
pub struct Verifier {
    key: VerifyingKey,
    window_secs: u64,
}

impl Verifier {
    /// `public_key_hex` is the application's public key as the developer portal shows it.
    pub fn new(public_key_hex: &str, window_secs: u32) -> Result<Self, String> {
        let bytes: [u8; 32] = hex::decode(public_key_hex.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("the Discord public key must be 64 hex characters")?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| "the Discord public key is not a valid Ed25519 key")?;
        Ok(Verifier {
            key,
            window_secs: u64::from(window_secs),
        })
    }

    /// Verifies one request: the two headers' values (if present), the raw body, and the
    /// current Unix time in seconds.
    pub fn verify(
        &self,
        signature_hex: Option<&str>,
        timestamp: Option<&str>,
        body: &[u8],
        now_secs: i64,
    ) -> Result<(), SignatureError> {
        let (Some(signature_hex), Some(timestamp)) = (signature_hex, timestamp) else {
            return Err(SignatureError::Missing);
        };
        let mut raw = [0u8; 64];
        hex::decode_to_slice(signature_hex, &mut raw).map_err(|_| SignatureError::Malformed)?;
        let signature = Signature::from_bytes(&raw);
        let mut message = Vec::with_capacity(timestamp.len() + body.len());
        message.extend_from_slice(timestamp.as_bytes());
        message.extend_from_slice(body);
        self.key
            .verify_strict(&message, &signature)
            .map_err(|_| SignatureError::Invalid)?;
        // Checked after the signature so that an attacker learns nothing from the timing of
        // a refusal; the timestamp is signed, so a valid signature makes it trustworthy.
        let sent: i64 = timestamp
            .parse()
            .map_err(|_| SignatureError::BadTimestamp)?;
        // The distance, not `(now - sent).abs()`: that overflows when the two are further
        // apart than `i64::MAX`, and would let such a timestamp through.
        if now_secs.abs_diff(sent) > self.window_secs {
            return Err(SignatureError::Stale {
                skew_secs: now_secs.saturating_sub(sent),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const NOW: i64 = 1_790_000_000;

    fn keys() -> (SigningKey, Verifier) {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let verifier =
            Verifier::new(&hex::encode(signing.verifying_key().to_bytes()), 300).expect("key");
        (signing, verifier)
    }

    fn sign(key: &SigningKey, timestamp: &str, body: &[u8]) -> String {
        let mut message = timestamp.as_bytes().to_vec();
        message.extend_from_slice(body);
        hex::encode(key.sign(&message).to_bytes())
    }

    #[test]
    fn a_signed_fresh_request_passes() {
        let (key, v) = keys();
        let body = br#"{"type":1}"#;
        let ts = NOW.to_string();
        assert_eq!(
            v.verify(Some(&sign(&key, &ts, body)), Some(&ts), body, NOW),
            Ok(())
        );
        let edge = (NOW - 300).to_string();
        assert_eq!(
            v.verify(Some(&sign(&key, &edge, body)), Some(&edge), body, NOW),
            Ok(())
        );
    }

    #[test]
    fn every_bad_variant_is_refused() {
        let (key, v) = keys();
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let body = br#"{"type":1}"#;
        let ts = NOW.to_string();
        let good = sign(&key, &ts, body);
        let old = (NOW - 301).to_string();
        let future = (NOW + 301).to_string();
        let mut flipped = hex::decode(&good).expect("hex");
        flipped[10] ^= 1;
        type Case<'a> = (Option<String>, Option<String>, &'a [u8], SignatureError);
        let cases: Vec<Case> = vec![
            (None, Some(ts.clone()), body, SignatureError::Missing),
            (Some(good.clone()), None, body, SignatureError::Missing),
            (
                Some("zz".repeat(64)),
                Some(ts.clone()),
                body,
                SignatureError::Malformed,
            ),
            (
                Some(good[..100].to_string()),
                Some(ts.clone()),
                body,
                SignatureError::Malformed,
            ),
            (
                Some(String::new()),
                Some(ts.clone()),
                body,
                SignatureError::Malformed,
            ),
            (
                Some(hex::encode(flipped)),
                Some(ts.clone()),
                body,
                SignatureError::Invalid,
            ),
            (
                Some(good.clone()),
                Some(ts.clone()),
                br#"{"type":2}"#,
                SignatureError::Invalid,
            ),
            (
                Some(good.clone()),
                Some((NOW + 1).to_string()),
                body,
                SignatureError::Invalid,
            ),
            (
                Some(sign(&other, &ts, body)),
                Some(ts.clone()),
                body,
                SignatureError::Invalid,
            ),
            (
                Some("00".repeat(64)),
                Some(ts.clone()),
                body,
                SignatureError::Invalid,
            ),
            (
                Some(sign(&key, &old, body)),
                Some(old.clone()),
                body,
                SignatureError::Stale { skew_secs: 301 },
            ),
            (
                Some(sign(&key, &future, body)),
                Some(future.clone()),
                body,
                SignatureError::Stale { skew_secs: -301 },
            ),
            (
                Some(sign(&key, "soon", body)),
                Some("soon".into()),
                body,
                SignatureError::BadTimestamp,
            ),
        ];
        for (sig, ts, body, want) in cases {
            assert_eq!(
                v.verify(sig.as_deref(), ts.as_deref(), body, NOW),
                Err(want.clone()),
                "{want}"
            );
        }
    }

    #[test]
    fn timestamps_further_than_i64_reaches_are_stale() {
        let (key, v) = keys();
        let body = br#"{"type":1}"#;
        for (sent, now) in [(i64::MAX, -2), (1, i64::MIN), (i64::MIN, i64::MAX)] {
            let ts = sent.to_string();
            let skew_secs = now.saturating_sub(sent);
            assert_eq!(
                v.verify(Some(&sign(&key, &ts, body)), Some(&ts), body, now),
                Err(SignatureError::Stale { skew_secs }),
                "sent {sent}, now {now}"
            );
        }
    }

    #[test]
    fn bad_public_keys_are_configuration_errors() {
        assert!(Verifier::new("abc", 5).is_err());
        assert!(Verifier::new(&"zz".repeat(32), 5).is_err());
    }
}
