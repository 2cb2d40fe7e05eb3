//! The signing secret and the `webhook-signature` header of the Standard Webhooks
//! specification: `v1,` + base64(HMAC-SHA256(secret, "{msg_id}.{timestamp}.{body}")).

use super::WebhookError;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

const PREFIX: &str = "whsec_";
const SIGNATURE_VERSION: &str = "v1,";
/// Bytes in a secret made by [`WebhookSecret::generate`].
const GENERATED_LEN: usize = 32;
const MIN_LEN: usize = 16;
const MAX_LEN: usize = 64;

/// Standard base64 with or without padding: secrets made by other Standard Webhooks
/// implementations come both ways.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A webhook signing secret: 16 to 64 bytes, zeroized on drop, never printed.
#[derive(Clone)]
pub struct WebhookSecret {
    key: Zeroizing<Vec<u8>>,
}

impl WebhookSecret {
    /// A new secret of 32 bytes from the operating system's random source.
    pub fn generate() -> WebhookSecret {
        let mut key = Zeroizing::new(vec![0u8; GENERATED_LEN]);
        OsRng.fill_bytes(&mut key);
        WebhookSecret { key }
    }

    /// Reads `whsec_` followed by standard base64 (padding optional). The error says what is
    /// wrong, never what was given.
    pub fn parse(text: &str) -> Result<WebhookSecret, WebhookError> {
        if text.is_empty() {
            return Err(WebhookError::SecretEmpty);
        }
        let encoded = text
            .strip_prefix(PREFIX)
            .ok_or(WebhookError::SecretPrefix)?;
        if encoded.is_empty() {
            return Err(WebhookError::SecretEmpty);
        }
        let mut key = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(encoded.len())]);
        let len = LENIENT
            .decode_slice(encoded, &mut key)
            .map_err(|_| WebhookError::SecretEncoding)?;
        key.truncate(len);
        Self::checked(key)
    }

    /// A secret from raw bytes, held to the same length rule as [`WebhookSecret::parse`].
    pub fn from_bytes(bytes: &[u8]) -> Result<WebhookSecret, WebhookError> {
        Self::checked(Zeroizing::new(bytes.to_vec()))
    }

    fn checked(key: Zeroizing<Vec<u8>>) -> Result<WebhookSecret, WebhookError> {
        if !(MIN_LEN..=MAX_LEN).contains(&key.len()) {
            return Err(WebhookError::SecretLength {
                min: MIN_LEN,
                max: MAX_LEN,
                given: key.len(),
            });
        }
        Ok(WebhookSecret { key })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.key
    }

    /// The secret as `whsec_…`, to be shown to its owner once.
    pub fn expose(&self) -> Zeroizing<String> {
        let encoded_len = base64::encoded_len(self.key.len(), true).unwrap_or(0);
        let mut text = Zeroizing::new(String::with_capacity(PREFIX.len() + encoded_len));
        text.push_str(PREFIX);
        STANDARD.encode_string(&*self.key, &mut text);
        text
    }

    /// `v1,` + base64(HMAC-SHA256(key, "{msg_id}.{timestamp}.{body}")).
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(msg_id, timestamp, body).finalize().into_bytes();
        let mut signature = String::from(SIGNATURE_VERSION);
        STANDARD.encode_string(tag, &mut signature);
        signature
    }

    /// Whether any `v1` signature in a `webhook-signature` header value was made with this
    /// secret; compared in constant time.
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        let mac = self.mac(msg_id, timestamp, body);
        header
            .split(' ')
            .filter_map(|entry| entry.strip_prefix(SIGNATURE_VERSION))
            .filter_map(|encoded| STANDARD.decode(encoded).ok())
            .any(|tag| mac.clone().verify_slice(&tag).is_ok())
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// The `webhook-signature` header value: one signature per secret, space-separated, so that
/// receivers accept a message during a rotation whichever secret they hold.
pub fn signature_header(
    secrets: &[&WebhookSecret],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector published with the Standard Webhooks specification.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn spec_secret() -> WebhookSecret {
        WebhookSecret::parse(SPEC_SECRET).expect("the specification's secret parses")
    }

    #[test]
    fn signs_the_specification_test_vector() {
        let signature = spec_secret().sign(SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY);
        assert_eq!(signature, SPEC_SIGNATURE);
    }

    #[test]
    fn verifies_the_specification_test_vector_and_nothing_else() {
        let secret = spec_secret();
        assert!(secret.verify(SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY, SPEC_SIGNATURE));
        assert!(!secret.verify(SPEC_MSG_ID, SPEC_TIMESTAMP + 1, SPEC_BODY, SPEC_SIGNATURE));
        assert!(!secret.verify("msg_other", SPEC_TIMESTAMP, SPEC_BODY, SPEC_SIGNATURE));
        assert!(!secret.verify(SPEC_MSG_ID, SPEC_TIMESTAMP, b"{}", SPEC_SIGNATURE));
        let other = WebhookSecret::generate();
        assert!(!other.verify(SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY, SPEC_SIGNATURE));
    }

    #[test]
    fn the_header_carries_one_signature_per_secret_in_order() {
        let old = spec_secret();
        let new = WebhookSecret::generate();
        let header = signature_header(&[&old, &new], SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY);
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], SPEC_SIGNATURE);
        assert_eq!(entries[1], new.sign(SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY));
        assert_ne!(entries[0], entries[1]);
        assert!(old.verify(SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY, &header));
        assert!(new.verify(SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY, &header));
        assert_eq!(
            signature_header(&[], SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY),
            ""
        );
    }

    #[test]
    fn a_generated_secret_survives_expose_and_parse() {
        let secret = WebhookSecret::generate();
        assert_eq!(secret.as_bytes().len(), GENERATED_LEN);
        assert_ne!(secret.as_bytes(), WebhookSecret::generate().as_bytes());
        let shown = secret.expose();
        assert!(shown.starts_with("whsec_"));
        let again = WebhookSecret::parse(&shown).expect("an exposed secret parses");
        assert_eq!(again.as_bytes(), secret.as_bytes());
    }

    #[test]
    fn the_specification_secret_round_trips_without_padding_and_with() {
        let secret = spec_secret();
        assert_eq!(secret.as_bytes().len(), 24);
        assert_eq!(*secret.expose(), SPEC_SECRET);

        let odd = WebhookSecret::from_bytes(&[7u8; 17]).expect("17 bytes are enough");
        let padded = odd.expose();
        assert!(padded.ends_with('='));
        let unpadded = padded.trim_end_matches('=');
        let parsed = WebhookSecret::parse(unpadded).expect("padding is optional");
        assert_eq!(parsed.as_bytes(), odd.as_bytes());
    }

    #[test]
    fn refuses_malformed_secrets_without_repeating_them() {
        let short = format!("whsec_{}", STANDARD.encode([1u8; 15]));
        let long = format!("whsec_{}", STANDARD.encode([1u8; 65]));
        let cases = [
            ("", "webhook secret is empty"),
            ("whsec_", "webhook secret is empty"),
            (
                "sk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "webhook secret must start with whsec_",
            ),
            (
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "webhook secret must start with whsec_",
            ),
            (
                "whsec_MfKQ9r8G-KYqrTwjUPD8ILPZIo2LaLaSw",
                "webhook secret is not standard base64 after whsec_",
            ),
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw ",
                "webhook secret is not standard base64 after whsec_",
            ),
            (
                short.as_str(),
                "webhook secret must be 16 to 64 bytes (15 given)",
            ),
            (
                long.as_str(),
                "webhook secret must be 16 to 64 bytes (65 given)",
            ),
        ];
        for (text, message) in cases {
            let error = WebhookSecret::parse(text).expect_err(text);
            assert_eq!(error.to_string(), message, "for {text:?}");
        }
    }

    #[test]
    fn from_bytes_keeps_the_length_rule() {
        assert!(WebhookSecret::from_bytes(&[0u8; 15]).is_err());
        assert!(WebhookSecret::from_bytes(&[0u8; 65]).is_err());
        assert!(WebhookSecret::from_bytes(&[]).is_err());
        let min = WebhookSecret::from_bytes(&[9u8; 16]).expect("16 bytes");
        assert_eq!(min.as_bytes(), &[9u8; 16]);
        assert!(WebhookSecret::from_bytes(&[9u8; 64]).is_ok());
    }

    #[test]
    fn debug_output_is_redacted() {
        let secret = spec_secret();
        let printed = format!("{secret:?}");
        assert_eq!(printed, "WebhookSecret(<redacted>)");
        assert_eq!(
            format!("{:?}", Some(&secret)),
            "Some(WebhookSecret(<redacted>))"
        );
        assert!(!format!("{secret:#?}").contains("MfKQ"));
    }
}
