use crate::limits::RateLimiter;
use crate::streams::StreamPermits;
use sparkle_core::{Catalog, Limits};
use sparkle_delivery::events::JobEvents;
use sparkle_delivery::webhook::UrlPolicy;
use sparkle_queue::{ApiKeys, JobQueue, Outbox};
use sparkle_store::{ImageLinks, ImageStore};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Gateway settings (a part of the service configuration).
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest body of a request with credentials to a route that takes images.
    pub max_image_body_bytes: usize,
    /// Most queued jobs before new work is refused with 503 and `Retry-After`.
    pub max_queued_jobs: u64,
    /// Attempts a job gets before it is dead-lettered.
    pub max_attempts: u32,
    /// How long the synchronous OpenAI route waits for its images.
    pub sync_timeout: Duration,
    /// Event streams open at once, in all and for one API key.
    pub max_event_streams: usize,
    pub max_event_streams_per_key: usize,
    /// How long a client has to send its body, and a route that does not wait for images to
    /// answer.
    pub request_timeout: Duration,
    /// Requests a second from one client address, before authentication (0: no limit), and
    /// the burst above that rate.
    pub per_ip_requests_per_sec: u32,
    pub per_ip_burst: u32,
    /// Requests a second with one API key (0: no limit), and the burst above that rate.
    pub per_key_requests_per_sec: u32,
    pub per_key_burst: u32,
    /// Queued plus running jobs one API key may have (0: no limit).
    pub max_live_jobs_per_key: u64,
    /// The base URL image links are made with (scheme, host, port; no trailing slash), as
    /// clients reach this gateway.
    pub public_url: String,
    /// Why no worker will run the jobs this gateway accepts, when that is known (a local
    /// scaler allowed no workers): readiness fails with it.
    pub no_workers: Option<String>,
    /// How long a browser session lasts from sign-in.
    pub session_ttl: Duration,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            max_body_bytes: 64 * 1024,
            max_image_body_bytes: 32 << 20,
            max_queued_jobs: 10_000,
            max_attempts: 3,
            sync_timeout: Duration::from_secs(600),
            max_event_streams: 4096,
            max_event_streams_per_key: 32,
            request_timeout: Duration::from_secs(30),
            per_ip_requests_per_sec: 50,
            per_ip_burst: 200,
            per_key_requests_per_sec: 20,
            per_key_burst: 100,
            max_live_jobs_per_key: 100,
            public_url: "https://127.0.0.1:8443".into(),
            no_workers: None,
            session_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct GatewayState {
    pub queue: Arc<dyn JobQueue>,
    pub keys: Arc<dyn ApiKeys>,
    pub store: Arc<dyn ImageStore>,
    /// Signs and checks the links that fetch an image without an API key.
    pub links: Arc<ImageLinks>,
    pub catalog: Arc<Catalog>,
    pub limits: Arc<Limits>,
    pub options: Arc<GatewayOptions>,
    /// The Discord interactions endpoint, when an application is configured.
    pub discord: Option<Arc<DiscordEndpoint>>,
    /// Request rates, as the options set them.
    pub admission: Arc<Admission>,
    /// Where job changes are pushed: event streams and synchronous waits subscribe here.
    pub events: Arc<JobEvents>,
    /// The outbox's view of each job's deliveries.
    pub outbox: Arc<dyn Outbox>,
    /// Event streams open now, counted against the options' caps.
    pub streams: Arc<StreamPermits>,
    /// Where webhooks may point.
    pub webhooks: UrlPolicy,
}

/// The rate limiters every request passes.
pub struct Admission {
    /// By client address, before authentication.
    pub per_ip: Option<RateLimiter<IpAddr>>,
    /// By API key id, once authenticated.
    pub per_key: Option<RateLimiter<String>>,
}

impl Admission {
    pub fn new(options: &GatewayOptions) -> Self {
        Admission {
            per_ip: RateLimiter::new(options.per_ip_requests_per_sec, options.per_ip_burst),
            per_key: RateLimiter::new(options.per_key_requests_per_sec, options.per_key_burst),
        }
    }
}

/// What the Discord endpoint needs.
pub struct DiscordEndpoint {
    pub verifier: sparkle_discord::Verifier,
    /// Signs and checks the ids of the buttons on Sparkle's messages.
    pub buttons: Arc<sparkle_discord::ButtonSigner>,
    /// How long an interaction token lives (Discord: 15 minutes).
    pub token_lifetime: Duration,
    pub policy: DiscordPolicies,
    /// Verified interactions by Discord user and by guild: Discord's few addresses carry
    /// every user's commands, so these, not the per-address limits, bound one user or one
    /// server.
    pub rates: DiscordRates,
    /// Fetches the images attached to `/sparkle` from Discord's CDN.
    pub files: sparkle_discord::AttachedFiles,
}

/// The request rates of verified Discord interactions.
#[derive(Default)]
pub struct DiscordRates {
    pub per_user: Option<RateLimiter<String>>,
    pub per_guild: Option<RateLimiter<String>>,
}

impl DiscordRates {
    /// `(per_sec, burst)` for a user and for a guild; a rate of 0 is no limit.
    pub fn new(per_user: (u32, u32), per_guild: (u32, u32)) -> Self {
        DiscordRates {
            per_user: RateLimiter::new(per_user.0, per_user.1),
            per_guild: RateLimiter::new(per_guild.0, per_guild.1),
        }
    }
}

/// The policy for each place `/sparkle` is used: servers with their own, and the global one
/// for every other server and for DMs.
#[derive(Debug, Clone, Default)]
pub struct DiscordPolicies {
    pub global: DiscordPolicy,
    /// Whole policies by guild (server) id, already merged with the global one.
    pub guilds: HashMap<String, DiscordPolicy>,
}

impl DiscordPolicies {
    /// The policy of the server `guild` (`None`: a DM).
    pub fn for_guild(&self, guild: Option<&str>) -> &DiscordPolicy {
        guild
            .and_then(|g| self.guilds.get(g))
            .unwrap_or(&self.global)
    }
}

/// Who may ask for what through Discord.
#[derive(Debug, Clone, Default)]
pub struct DiscordPolicy {
    /// Channels where `/sparkle` works; empty: everywhere (DMs included).
    pub allowed_channels: Vec<String>,
    /// Words refused in prompts (case-insensitive, whole words).
    pub denied_words: Vec<String>,
    /// Queued plus running jobs one Discord user may have; 0: no limit.
    pub max_live_per_user: u64,
}

impl DiscordPolicy {
    /// Why this request is refused, if it is.
    pub fn refusal(&self, channel: Option<&str>, prompt: &str) -> Option<String> {
        if !self.allowed_channels.is_empty()
            && !channel.is_some_and(|c| self.allowed_channels.iter().any(|a| a == c))
        {
            return Some("Sparkle is not enabled in this channel.".into());
        }
        let lowered = prompt.to_lowercase();
        let words: Vec<&str> = lowered.split(|c: char| !c.is_alphanumeric()).collect();
        let denied = self.denied_words.iter().find(|w| {
            let w = w.to_lowercase();
            if w.contains(' ') {
                lowered.contains(&w)
            } else {
                words.contains(&w.as_str())
            }
        });
        denied.map(|_| "That prompt is not allowed here.".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_with_its_own_policy_gets_it_and_everyone_else_the_global_one() {
        let global = DiscordPolicy {
            denied_words: vec!["gore".into()],
            max_live_per_user: 3,
            ..Default::default()
        };
        let strict = DiscordPolicy {
            denied_words: vec!["gore".into(), "dragon".into()],
            max_live_per_user: 1,
            ..Default::default()
        };
        let policies = DiscordPolicies {
            global,
            guilds: HashMap::from([("500".to_string(), strict)]),
        };
        let dragon = "a red dragon";
        assert!(policies
            .for_guild(Some("500"))
            .refusal(None, dragon)
            .is_some());
        assert_eq!(policies.for_guild(Some("500")).max_live_per_user, 1);
        for elsewhere in [Some("501"), None] {
            let policy = policies.for_guild(elsewhere);
            assert!(policy.refusal(None, dragon).is_none(), "{elsewhere:?}");
            assert!(policy.refusal(None, "gore").is_some(), "{elsewhere:?}");
            assert_eq!(policy.max_live_per_user, 3);
        }
    }
}
