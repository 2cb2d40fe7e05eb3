//! Signed, expiring links to images: a URL that fetches one image without an API key, for
//! clients (OpenAI's `url` response format, a browser, a chat message) that cannot send one.
//!
//! A link is `{base}/v1/jobs/{job}/images/{index}?expires={unix secs}&key={key id}&sig={sig}`.
//! `sig` is unpadded URL-safe base64 of HMAC-SHA256 over the job id, the index, the expiry
//! and the key id, each framed by its length, under a link key derived (HKDF-SHA256) from the
//! master key the link names. So a link says which master key signed it: rotation leaves the
//! links of a still-live key working, and retiring a key ends every link it signed. Nothing in
//! a link is secret but the signature, which is never shown by `Debug`.

use crate::ImageKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sparkle_seal::{MasterKeyId, MasterKeys};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How long a link lives unless configured otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// How much further than the lifetime an expiry may lie ahead of now: room for clocks that
/// differ between the gateways of one deployment, and no more.
const CLOCK_SKEW_SECS: i64 = 300;

/// HKDF info of the link key, apart from every other key derived from a master key.
const LINK_KEY_INFO: &[u8] = b"sparkle image link v1";

/// Signs and checks image links with the keyring's master keys.
pub struct ImageLinks {
    keys: Arc<MasterKeys>,
    lifetime: Duration,
}

impl fmt::Debug for ImageLinks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageLinks")
            .field("keys", &self.keys)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// A link and when it stops working.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedLink {
    pub url: String,
    /// Unix seconds.
    pub expires_at: i64,
}

impl fmt::Debug for SignedLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = match self.url.split_once("&sig=") {
            Some((signed, _)) => format!("{signed}&sig=<redacted>"),
            None => self.url.clone(),
        };
        f.debug_struct("SignedLink")
            .field("url", &shown)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A link's query parameters as the request carried them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LinkQuery {
    pub expires: String,
    pub key: String,
    pub sig: String,
}

impl fmt::Debug for LinkQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkQuery")
            .field("expires", &self.expires)
            .field("key", &self.key)
            .field("sig", &"<redacted>")
            .finish()
    }
}

/// Why a link does not open its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkRefusal {
    /// Genuine, but its time is up.
    #[error("the image link expired")]
    Expired,
    /// The signature does not match what the link says (a changed job, index, expiry, key
    /// or signature), or the link claims a longer life than links are given.
    #[error("the image link is not valid")]
    Altered,
    /// Signed with a master key this keyring does not hold, or holds only retired.
    #[error("the image link was signed with a key that is no longer in use")]
    UnknownKey,
    /// A parameter is missing or not in the form links are made with.
    #[error("the image link is malformed")]
    Malformed,
}

impl ImageLinks {
    pub fn new(keys: Arc<MasterKeys>, lifetime: Duration) -> ImageLinks {
        ImageLinks { keys, lifetime }
    }

    /// How long a new link lives.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn lifetime_secs(&self) -> i64 {
        i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX)
    }

    /// A link to `image` under `base_url` (scheme, host and port, e.g.
    /// `https://sparkle.example.com`), signed with the active master key, expiring one
    /// lifetime after `now_secs`.
    pub fn sign(&self, base_url: &str, image: ImageKey, now_secs: i64) -> SignedLink {
        let (id, mac) = self.keys.active_mac(LINK_KEY_INFO);
        let expires_at = now_secs.saturating_add(self.lifetime_secs());
        let sig =
            URL_SAFE_NO_PAD.encode(framed(mac, image, expires_at, &id).finalize().into_bytes());
        SignedLink {
            url: format!(
                "{}/v1/jobs/{}/images/{}?expires={expires_at}&key={id}&sig={sig}",
                base_url.trim_end_matches('/'),
                image.job,
                image.index
            ),
            expires_at,
        }
    }

    /// Whether `query` is a link to `image` that is genuine and still live at `now_secs`.
    /// The signature is compared in constant time, and checked before the expiry, so only a
    /// genuine link is ever said to have expired.
    pub fn verify(
        &self,
        image: ImageKey,
        query: &LinkQuery,
        now_secs: i64,
    ) -> Result<(), LinkRefusal> {
        let expires_at = parse_expiry(&query.expires)?;
        let id = MasterKeyId::new(&query.key).map_err(|_| LinkRefusal::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(&query.sig)
            .map_err(|_| LinkRefusal::Malformed)?;
        let latest = now_secs
            .saturating_add(self.lifetime_secs())
            .saturating_add(CLOCK_SKEW_SECS);
        if expires_at > latest {
            return Err(LinkRefusal::Altered);
        }
        let mac = self
            .keys
            .mac_under(&id, LINK_KEY_INFO)
            .ok_or(LinkRefusal::UnknownKey)?;
        framed(mac, image, expires_at, &id)
            .verify_slice(&sig)
            .map_err(|_| LinkRefusal::Altered)?;
        if now_secs >= expires_at {
            return Err(LinkRefusal::Expired);
        }
        Ok(())
    }
}

/// An expiry in the one form links carry: decimal digits, no sign, no leading zeros.
fn parse_expiry(text: &str) -> Result<i64, LinkRefusal> {
    let canonical = !text.is_empty()
        && text.len() <= 19
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return Err(LinkRefusal::Malformed);
    }
    text.parse().map_err(|_| LinkRefusal::Malformed)
}

/// The MAC over everything a link says, each part framed so no two links share an input.
fn framed(
    mut mac: Hmac<Sha256>,
    image: ImageKey,
    expires_at: i64,
    id: &MasterKeyId,
) -> Hmac<Sha256> {
    let job = image.job.to_string();
    mac.update(&(job.len() as u32).to_be_bytes());
    mac.update(job.as_bytes());
    mac.update(&image.index.to_be_bytes());
    mac.update(&expires_at.to_be_bytes());
    mac.update(&(id.as_str().len() as u32).to_be_bytes());
    mac.update(id.as_str().as_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkle_core::JobId;
    use sparkle_seal::Keyring;

    const NOW: i64 = 1_700_000_000;
    const BASE: &str = "https://sparkle.example.com";

    fn links(ring: Keyring) -> ImageLinks {
        ImageLinks::new(Arc::new(MasterKeys::fixed(ring)), DEFAULT_LIFETIME)
    }

    fn image(index: u32) -> ImageKey {
        ImageKey {
            job: JobId::random(),
            index,
        }
    }

    /// The image and query a link names, read back from its URL.
    fn parse(url: &str) -> (ImageKey, LinkQuery) {
        let rest = url.strip_prefix(BASE).expect("base");
        let (path, query) = rest.split_once('?').expect("query");
        let parts: Vec<&str> = path.split('/').collect();
        assert_eq!(parts[..4], ["", "v1", "jobs", parts[3]]);
        let image = ImageKey {
            job: parts[3].parse().expect("job id"),
            index: parts[5].parse().expect("index"),
        };
        let mut q = LinkQuery::default();
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').expect("pair");
            match name {
                "expires" => q.expires = value.into(),
                "key" => q.key = value.into(),
                "sig" => q.sig = value.into(),
                other => panic!("unexpected parameter {other}"),
            }
        }
        (image, q)
    }

    #[test]
    fn a_link_round_trips_until_it_expires() {
        let links = links(Keyring::generate(1));
        let key = image(2);
        let link = links.sign(&format!("{BASE}/"), key, NOW);
        assert_eq!(link.expires_at, NOW + 3600);
        assert!(link.url.starts_with(&format!(
            "{BASE}/v1/jobs/{}/images/2?expires={}&key=mk-",
            key.job,
            NOW + 3600
        )));
        let (named, query) = parse(&link.url);
        assert_eq!(named, key);
        assert_eq!(links.verify(key, &query, NOW), Ok(()));
        assert_eq!(links.verify(key, &query, NOW + 3599), Ok(()));
        assert_eq!(
            links.verify(key, &query, NOW + 3600),
            Err(LinkRefusal::Expired)
        );
        assert_eq!(
            links.verify(key, &query, NOW + 90_000),
            Err(LinkRefusal::Expired)
        );
    }

    #[test]
    fn every_altered_part_is_refused() {
        let links = links(Keyring::generate(1));
        let key = image(1);
        let (_, query) = parse(&links.sign(BASE, key, NOW).url);
        let other_job = ImageKey {
            job: JobId::random(),
            ..key
        };
        assert_eq!(
            links.verify(other_job, &query, NOW),
            Err(LinkRefusal::Altered)
        );
        assert_eq!(
            links.verify(ImageKey { index: 0, ..key }, &query, NOW),
            Err(LinkRefusal::Altered)
        );
        let later = LinkQuery {
            expires: (NOW + 3601).to_string(),
            ..query.clone()
        };
        assert_eq!(links.verify(key, &later, NOW), Err(LinkRefusal::Altered));
        let earlier = LinkQuery {
            expires: (NOW - 1).to_string(),
            ..query.clone()
        };
        assert_eq!(
            links.verify(key, &earlier, NOW),
            Err(LinkRefusal::Altered),
            "a changed expiry is altered, not expired"
        );
        // One character of the signature changed (the first: every bit of it counts).
        let mut sig = query.sig.clone().into_bytes();
        sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
        let forged = LinkQuery {
            sig: String::from_utf8(sig).expect("ascii"),
            ..query.clone()
        };
        assert_eq!(links.verify(key, &forged, NOW), Err(LinkRefusal::Altered));
        let short = LinkQuery {
            sig: query.sig[..20].to_string(),
            ..query.clone()
        };
        assert_eq!(links.verify(key, &short, NOW), Err(LinkRefusal::Altered));
        // A signature made for a longer life than links get is refused, signed or not.
        let long = ImageLinks::new(links.keys.clone(), Duration::from_secs(86_400));
        let (_, query) = parse(&long.sign(BASE, key, NOW).url);
        assert_eq!(long.verify(key, &query, NOW), Ok(()));
        assert_eq!(links.verify(key, &query, NOW), Err(LinkRefusal::Altered));
    }

    #[test]
    fn malformed_parameters_are_refused() {
        let links = links(Keyring::generate(1));
        let key = image(0);
        let (_, query) = parse(&links.sign(BASE, key, NOW).url);
        let expires = |e: &str| LinkQuery {
            expires: e.into(),
            ..query.clone()
        };
        for bad in [
            String::new(),
            format!("+{}", query.expires),
            format!("0{}", query.expires),
            format!("{}.0", query.expires),
            "-1".into(),
            "99999999999999999999".into(),
        ] {
            assert_eq!(
                links.verify(key, &expires(&bad), NOW),
                Err(LinkRefusal::Malformed),
                "{bad:?}"
            );
        }
        let no_key = LinkQuery {
            key: String::new(),
            ..query.clone()
        };
        assert_eq!(links.verify(key, &no_key, NOW), Err(LinkRefusal::Malformed));
        let not_base64 = LinkQuery {
            sig: "%%%".into(),
            ..query.clone()
        };
        assert_eq!(
            links.verify(key, &not_base64, NOW),
            Err(LinkRefusal::Malformed)
        );
        assert_eq!(
            links.verify(key, &LinkQuery::default(), NOW),
            Err(LinkRefusal::Malformed)
        );
    }

    #[test]
    fn rotation_keeps_live_keys_links_and_retirement_ends_them() {
        let mut ring = Keyring::generate(1);
        let first = ring.active_id().clone();
        let key = image(0);
        let (_, old) = parse(&links(ring.clone()).sign(BASE, key, NOW).url);
        assert_eq!(old.key, first.as_str());

        let second = ring.rotate(2);
        let rotated = links(ring.clone());
        assert_eq!(rotated.verify(key, &old, NOW), Ok(()), "a live key's link");
        let (_, new) = parse(&rotated.sign(BASE, key, NOW).url);
        assert_eq!(new.key, second.as_str(), "new links use the active key");
        assert_eq!(rotated.verify(key, &new, NOW), Ok(()));
        let relabelled = LinkQuery {
            key: first.to_string(),
            ..new.clone()
        };
        assert_eq!(
            rotated.verify(key, &relabelled, NOW),
            Err(LinkRefusal::Altered),
            "a signature holds only under the key it names"
        );

        ring.retire(&first, 3).expect("retire");
        let retired = links(ring);
        assert_eq!(retired.verify(key, &old, NOW), Err(LinkRefusal::UnknownKey));
        assert_eq!(retired.verify(key, &new, NOW), Ok(()));
        let unknown = LinkQuery {
            key: "mk-00000000".into(),
            ..new
        };
        assert_eq!(
            retired.verify(key, &unknown, NOW),
            Err(LinkRefusal::UnknownKey)
        );
        assert_eq!(
            links(Keyring::generate(1)).verify(key, &old, NOW),
            Err(LinkRefusal::UnknownKey),
            "another deployment's keyring"
        );
    }

    #[test]
    fn debug_output_shows_no_signature_or_key_material() {
        let ring = Keyring::generate(1);
        let active = ring
            .keys()
            .iter()
            .find(|k| &k.id == ring.active_id())
            .and_then(|k| k.material())
            .expect("the active key's material");
        let hex = active.to_hex();
        let derived =
            URL_SAFE_NO_PAD.encode(sparkle_seal::derived_key(active, LINK_KEY_INFO).as_ref());
        let links = links(ring);
        let link = links.sign(BASE, image(0), NOW);
        let (_, query) = parse(&link.url);
        let shown = format!("{links:?} {link:?} {query:?}");
        assert!(!shown.contains(&query.sig), "{shown}");
        assert!(!shown.contains(hex.as_str()), "{shown}");
        assert!(!shown.contains(&derived), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
