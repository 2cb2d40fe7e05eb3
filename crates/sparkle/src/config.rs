//! The service configuration: one struct, documented field by field, read from
//! `sparkle.toml` < environment (`SPARKLE_*`, nested with `__`, e.g.
//! `SPARKLE_SCALER__MAX_WORKERS=2`; each value as written, see [`environment`]) <
//! command-line flags. Unknown fields are refused.

mod environment;

use anyhow::{bail, Context};
use environment::Environment;
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use sparkle_core::Limits;
use sparkle_gateway::{DiscordPolicies, DiscordPolicy};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest an image link may live: a week.
const MAX_IMAGE_LINK_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Self-signed TLS, loopback binds: for one machine and for development.
    Dev,
    /// Refuses to start with an insecure setting.
    Production,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `dev` or `production`.
    pub profile: Profile,
    /// Where the database, images and generated certificates live.
    pub data_dir: PathBuf,
    /// The public HTTPS listener. Port 0 picks a free port (the chosen address is printed).
    pub listen: SocketAddr,
    /// The admin listener (metrics); loopback by default.
    pub admin_listen: SocketAddr,
    /// The worker protocol's listener (HTTPS), for `sparkle worker --control-plane` on other
    /// machines; unset: none. Reachable by the workers' network only.
    pub worker_listen: Option<SocketAddr>,
    /// The default model: a diffusers-layout directory or a single-file checkpoint (or a
    /// directory of them, the first by name being the default).
    pub model: Option<PathBuf>,
    /// More models the deployment serves, after `model`: each a model or a directory of
    /// models. Requests name one (`model`); workers keep the most recently used loaded.
    pub models: Vec<PathBuf>,
    pub tls: TlsConfig,
    pub gateway: GatewayConfig,
    pub database: DatabaseConfig,
    pub store: StoreConfig,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub scaler: ScalerConfig,
    pub limits: Limits,
    pub discord: DiscordConfig,
    pub webhooks: WebhooksConfig,
    pub encryption: EncryptionConfig,
    pub retention: RetentionConfig,
}

/// How long finished jobs are kept. A finished job can also be deleted at once with
/// `DELETE /v1/jobs/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days a finished job (its record, sealed fields, deliveries and images) is kept after
    /// it finished; 0 keeps them forever.
    pub days: u64,
    /// Seconds between passes that remove expired jobs and images no job keeps (left by an
    /// attempt that lost its lease, or by a process that stopped mid-way).
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            days: 30,
            interval_secs: 3600,
        }
    }
}

/// Webhooks (`webhook_url` on `POST /v1/jobs`), signed as the Standard Webhooks
/// specification says with a secret per API key (`sparkle key rotate-webhook-secret ID`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Let webhooks reach loopback, private, link-local and metadata addresses. Off: such
    /// URLs are refused when submitted and when sent (their names are resolved both times).
    /// For tests and closed networks only; refused under the production profile.
    pub allow_private_addresses: bool,
    /// Seconds to connect to a receiver.
    pub connect_timeout_secs: u64,
    /// Seconds a receiver has to answer; beyond, the attempt failed and is retried.
    pub timeout_secs: u64,
    /// Seconds before each retry, jittered by ±20 %; when they are spent the webhook is
    /// abandoned. Default: the specification's 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
    pub retry_delays_secs: Vec<u64>,
    /// Hours the secret a rotation replaced still signs beside the new one.
    pub rotation_grace_hours: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            allow_private_addresses: false,
            connect_timeout_secs: 5,
            timeout_secs: 15,
            retry_delays_secs: vec![5, 300, 1800, 7200, 18000, 36000, 36000],
            rotation_grace_hours: 24,
        }
    }
}

/// Encryption at rest. Images and sensitive database fields (prompts, user ids, Discord
/// interaction tokens) are always sealed; this says where the master keys are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// The keyring file (mode 0600), made with `sparkle keyring rotate`. Unset: `keyring` in the
    /// data directory, made on the first start of the dev profile. Every process of a
    /// deployment must read the same keyring.
    pub keyring_file: Option<PathBuf>,
}

/// The Discord application whose Interactions Endpoint URL points at this gateway
/// (`https://HOST/discord/interactions`). Unset `public_key`: the endpoint answers 404.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscordConfig {
    /// The application id (developer portal, General Information).
    pub application_id: Option<String>,
    /// The application's public key, hex, to verify that requests come from Discord.
    pub public_key: Option<String>,
    /// File holding the bot token (for registering the command and channel messages).
    pub bot_token_file: Option<PathBuf>,
    /// Discord's REST API base.
    pub api_base: String,
    /// Seconds a request's signed timestamp may be away from now.
    pub timestamp_window_secs: u32,
    /// Seconds an interaction token lives: Discord's 900. Lower only to rehearse the path
    /// where a job outlives its token.
    pub token_lifetime_secs: u64,
    /// Channel ids where `/sparkle` works; empty: everywhere.
    pub allowed_channels: Vec<String>,
    /// Words refused in prompts (case-insensitive; phrases with spaces match as substrings).
    pub denied_words: Vec<String>,
    /// Queued plus running jobs one Discord user may have at once; 0: no limit.
    pub max_jobs_per_user: u64,
    /// Servers with a policy of their own, by guild id (`[discord.guilds."123…"]`). DMs and
    /// servers not listed use the settings above.
    pub guilds: BTreeMap<String, DiscordGuildConfig>,
    /// File holding the key that signs button ids (hex, mode 0600); made on first start when
    /// unset, as `discord-button.key` in the data directory. Every gateway of a deployment
    /// must share it.
    pub button_key_file: Option<PathBuf>,
    /// Verified interactions one Discord user may send a second, after a first burst (0: no
    /// limit); beyond, an ephemeral "try again". Discord's requests come from a few
    /// addresses, so they are limited per user and per server, never per address.
    pub per_user_requests_per_sec: u32,
    pub per_user_burst: u32,
    /// Verified interactions from one server a second, after a first burst (0: no limit).
    pub per_guild_requests_per_sec: u32,
    pub per_guild_burst: u32,
    /// Hosts (`host` or `host:port`) the images attached to `/sparkle` are fetched from:
    /// Discord's CDN. Over https only under the production profile.
    pub attachment_hosts: Vec<String>,
}

impl Default for DiscordConfig {
    fn default() -> Self {
        DiscordConfig {
            application_id: None,
            public_key: None,
            bot_token_file: None,
            api_base: "https://discord.com/api/v10".into(),
            timestamp_window_secs: 300,
            token_lifetime_secs: 900,
            allowed_channels: Vec::new(),
            denied_words: Vec::new(),
            max_jobs_per_user: 3,
            guilds: BTreeMap::new(),
            button_key_file: None,
            per_user_requests_per_sec: 2,
            per_user_burst: 10,
            per_guild_requests_per_sec: 25,
            per_guild_burst: 100,
            attachment_hosts: sparkle_discord::DISCORD_FILE_HOSTS
                .iter()
                .map(|h| h.to_string())
                .collect(),
        }
    }
}

/// One server's policy: each field left out falls back to the `[discord]` one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscordGuildConfig {
    /// Channel ids of this server where `/sparkle` works; empty: all of its channels.
    pub allowed_channels: Option<Vec<String>>,
    /// Words refused in prompts in this server (replaces the global list).
    pub denied_words: Option<Vec<String>>,
    /// Live jobs a user may have when asking in this server; 0: no limit.
    pub max_jobs_per_user: Option<u64>,
}

impl DiscordConfig {
    /// The policies the gateway applies: the global one (DMs, servers not listed) and each
    /// listed server's, its unset fields taken from the global one.
    pub fn policies(&self) -> DiscordPolicies {
        let global = DiscordPolicy {
            allowed_channels: self.allowed_channels.clone(),
            denied_words: self.denied_words.clone(),
            max_live_per_user: self.max_jobs_per_user,
        };
        let guilds = self
            .guilds
            .iter()
            .map(|(guild, own)| {
                let policy = DiscordPolicy {
                    allowed_channels: own
                        .allowed_channels
                        .clone()
                        .unwrap_or_else(|| global.allowed_channels.clone()),
                    denied_words: own
                        .denied_words
                        .clone()
                        .unwrap_or_else(|| global.denied_words.clone()),
                    max_live_per_user: own.max_jobs_per_user.unwrap_or(global.max_live_per_user),
                };
                (guild.clone(), policy)
            })
            .collect();
        DiscordPolicies { global, guilds }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. In the dev profile a self-signed one is made when unset.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (mode 0600).
    pub key_file: Option<PathBuf>,
    /// Seconds between looks at the two files for a renewal; a changed pair is served on
    /// new connections without a restart.
    pub reload_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            reload_secs: 5,
        }
    }
}

/// Limits of the public listener against abuse: sizes, timeouts, connections and request
/// rates. A rate of 0 turns that limit off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest body of a request that carries images (`POST /v1/jobs`,
    /// `/v1/images/generations` and `/v1/images/edits` with credentials); each image within
    /// is bounded by `limits.max_source_bytes` too.
    pub max_image_body_bytes: usize,
    /// Largest request line plus headers (at least 8192); larger ones get 431.
    pub max_header_bytes: usize,
    /// Seconds a client has to finish the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a request's body, and a route that does not wait for
    /// images has to answer; beyond, 408.
    pub request_timeout_secs: u64,
    /// Seconds a client may leave the answer unread before the connection is dropped.
    pub send_timeout_secs: u64,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// Open connections from one address (an IPv6 /64) at most.
    pub max_connections_per_ip: usize,
    /// Requests per second from one address, before authentication; beyond, 429 with
    /// `Retry-After`. Health probes are not counted.
    pub per_ip_requests_per_sec: u32,
    /// Requests one address may send at once above its rate.
    pub per_ip_burst: u32,
    /// Requests per second with one API key; beyond, 429 with `Retry-After`.
    pub per_key_requests_per_sec: u32,
    /// Requests one key may send at once above its rate.
    pub per_key_burst: u32,
    /// Queued plus running jobs one API key may have; beyond, 429 `job_quota_exceeded` with
    /// `Retry-After`.
    pub max_live_jobs_per_key: u64,
    /// Event streams (`GET /v1/jobs/{id}/events`) open at once, in all; beyond, 429
    /// `too_many_streams`.
    pub max_event_streams: usize,
    /// Event streams one API key may have open at once.
    pub max_event_streams_per_key: usize,
    /// The address clients reach this gateway at (`https://HOST[:PORT]`), which image links
    /// are made with. Unset: `https://` and the listen address as bound.
    pub public_url: Option<String>,
    /// Seconds a signed image link (a job's `images`, the OpenAI route's `url`) fetches its
    /// image without an API key: 1 to 604800 (7 days).
    pub image_link_secs: u64,
    /// Hours a browser session (the web page's sign-in) lasts: 1 to 720. Signing out, or
    /// revoking the key, ends it sooner.
    pub session_hours: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 64 * 1024,
            max_image_body_bytes: 32 << 20,
            max_header_bytes: 16 * 1024,
            handshake_timeout_secs: 10,
            header_timeout_secs: 15,
            request_timeout_secs: 30,
            send_timeout_secs: 30,
            max_connections: 1024,
            max_connections_per_ip: 64,
            per_ip_requests_per_sec: 50,
            per_ip_burst: 200,
            per_key_requests_per_sec: 20,
            per_key_burst: 100,
            max_live_jobs_per_key: 100,
            max_event_streams: 4096,
            max_event_streams_per_key: 32,
            public_url: None,
            image_link_secs: 3600,
            session_hours: 12,
        }
    }
}

/// Where the queue and metadata live: SQLite in the data directory unless `url` names a
/// PostgreSQL server.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user@host:5432/db`; several hosts for a primary and its standbys
    /// (`postgres://user@a:5432,b:5432/db?target_session_attrs=read-write`). TLS is verified
    /// in full unless `sslmode=disable` (refused under the production profile). Keep the
    /// password out of it: `password_file`.
    pub url: Option<String>,
    /// The CA that signed the database server's certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// A file holding the password, read for each new connection: a rotated password or a
    /// short-lived token an agent writes there takes effect without a restart.
    pub password_file: Option<PathBuf>,
    /// Connections each process keeps at most (PostgreSQL).
    pub max_connections: Option<usize>,
}

/// Where images live: unset, `data_dir/images`; `url = "s3://BUCKET/PREFIX"`, an
/// S3-compatible bucket (TLS verified, SSE-S3 asked for, every image sealed here first).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub url: Option<String>,
    /// `https://HOST[:PORT]` of an S3-compatible service; unset: AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// An AWS shared-credentials file (`aws_access_key_id`, `aws_secret_access_key`),
    /// owner-only; unset: the standard AWS chain (environment, web identity, instance role).
    pub credentials_file: Option<PathBuf>,
    /// The CA that signed the endpoint's certificate (PEM); unset: the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password: only its hosts are shown.
        f.debug_struct("DatabaseConfig")
            .field(
                "hosts",
                &self.url.as_deref().map(|url| {
                    sparkle_queue::DatabaseUrl::parse(url)
                        .map(|u| u.hosts())
                        .ok()
                }),
            )
            .field("ca_file", &self.ca_file)
            .field("password_file", &self.password_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Seconds a lease lasts without a heartbeat before the job is handed to another worker.
    pub lease_timeout_secs: u64,
    /// Leases a job gets before it is dead-lettered.
    pub max_attempts: u32,
    /// Queued jobs beyond which new requests get 503 with `Retry-After`.
    pub max_queued_jobs: u64,
    /// Seconds the synchronous OpenAI route waits for its images.
    pub sync_timeout_secs: u64,
    /// Seconds a retryable failure waits before the job's next attempt, doubled with each
    /// attempt (at most 5 minutes) and jittered by ±20 %.
    pub retry_backoff_secs: u64,
    /// Seconds a job may run before it fails with `timeout` (not retried). 0: from the job's
    /// cost, two minutes and 20 s per step, megapixel and image.
    pub max_job_secs: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease_timeout_secs: 60,
            max_attempts: 3,
            max_queued_jobs: 10_000,
            sync_timeout_secs: 600,
            retry_backoff_secs: 2,
            max_job_secs: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Seconds between heartbeats while a job runs (progress is also sent as it happens).
    pub heartbeat_secs: u64,
    /// Most compatible jobs (same model, size, steps, scheduler) run as one batch.
    pub max_batch: usize,
    /// Milliseconds a partly filled batch waits for compatible jobs before it starts.
    pub batch_wait_ms: u64,
    /// Seconds a stopping worker may spend finishing its batch before giving it back.
    pub drain_timeout_secs: u64,
    /// `auto` (CUDA when built with it and present), `cpu`, or `cuda:N`.
    pub device: String,
    /// `auto` (f32 on the CPU, f16 on CUDA), `f32`, `f16` or `bf16` (CUDA only).
    pub precision: String,
    /// The largest image, in pixels (width × height), this worker takes; 0: what its device
    /// can make, from its free memory. Reported to the gateways, which refuse larger
    /// requests at submit.
    pub max_pixels: u64,
    /// Most models a worker keeps loaded at once; 0: as many as its device's memory holds.
    /// A job for a model not loaded loads it, unloading the least recently used first.
    pub max_loaded_models: usize,
    /// Seconds a worker token the control plane issues lives (5 to 3600): a revoked
    /// enrollment's workers stop at their next renewal, at two thirds of this.
    pub token_lifetime_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            heartbeat_secs: 5,
            max_batch: 1,
            batch_wait_ms: 50,
            drain_timeout_secs: 30,
            device: "auto".into(),
            precision: "auto".into(),
            max_pixels: 0,
            max_loaded_models: 0,
            token_lifetime_secs: 900,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalerConfig {
    /// Workers kept running when idle; 0 scales to zero.
    pub min_workers: u32,
    /// Most local workers; unset: one per GPU of `gpus` (one on a host without GPUs). 0:
    /// none (workers run elsewhere).
    pub max_workers: Option<u32>,
    /// The GPUs local workers run on, one worker each, pinned by `CUDA_VISIBLE_DEVICES`:
    /// `all` (every GPU `nvidia-smi` lists), `none` (the CPU), or indexes such as `0,2`.
    pub gpus: String,
    /// What starts and stops workers: `local` (worker processes on this host), `kubernetes`
    /// (the replica count of a Deployment, through its scale subresource) or `metric` (only
    /// `sparkle_workers_desired` is exported, for KEDA, an HPA or an autoscaling group).
    pub actuator: String,
    /// The workers' Deployment (`actuator = "kubernetes"`).
    pub kubernetes_deployment: String,
    /// Its namespace; unset: the service account's (or the kubeconfig's) own.
    pub kubernetes_namespace: Option<String>,
    /// Seconds of wait the pool is sized for: workers are added until the queued and
    /// running work (measured in cost, over what a worker gets through a second) drains
    /// within it.
    pub target_wait_secs: u64,
    /// Seconds workers must be surplus to the backlog before they stop (busy ones never).
    pub idle_grace_secs: u64,
    /// GPU-seconds the workers may spend in any hour; beyond, only busy workers are kept.
    /// 0: no budget.
    pub budget_gpu_secs_per_hour: u64,
    /// Cost units (one SD 1.5 step at 512²) a worker is assumed to get through a second
    /// until jobs have been measured.
    pub prior_units_per_sec: f64,
    /// Seconds a started worker is assumed to take to be ready.
    pub prior_ready_secs: f64,
    /// Milliseconds between scaling decisions.
    pub tick_ms: u64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            min_workers: 0,
            max_workers: None,
            gpus: "all".into(),
            actuator: "local".into(),
            kubernetes_deployment: "sparkle-worker".into(),
            kubernetes_namespace: None,
            target_wait_secs: 45,
            idle_grace_secs: 120,
            budget_gpu_secs_per_hour: 0,
            prior_units_per_sec: 25.0,
            prior_ready_secs: 10.0,
            tick_ms: 1000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            profile: Profile::Dev,
            data_dir: default_data_dir(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            worker_listen: None,
            model: None,
            models: Vec::new(),
            tls: TlsConfig::default(),
            gateway: GatewayConfig::default(),
            database: DatabaseConfig::default(),
            store: StoreConfig::default(),
            queue: QueueConfig::default(),
            worker: WorkerConfig::default(),
            scaler: ScalerConfig::default(),
            limits: Limits::default(),
            discord: DiscordConfig::default(),
            webhooks: WebhooksConfig::default(),
            encryption: EncryptionConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("sparkle");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/sparkle"),
        None => PathBuf::from("sparkle-data"),
    }
}

/// Flags that override the file and the environment; `None` leaves a value alone.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<PathBuf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaler: Option<ScalerFlags>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
}

/// The `[scaler]` settings flags override.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ScalerFlags {
    pub gpus: String,
}

impl Config {
    /// Reads the configuration: defaults < `file` < `SPARKLE_*` environment < `flags`.
    pub fn load(file: Option<&Path>, flags: &Overrides) -> anyhow::Result<Config> {
        let config = Config::read(file, flags)?;
        config.check()?;
        Ok(config)
    }

    /// Reads the configuration like [`Config::load`], without the checks that refuse
    /// settings (for `sparkle audit`, which reports them).
    pub fn read(file: Option<&Path>, flags: &Overrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                bail!("configuration file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: Config = figment
            .merge(Environment::new())
            .merge(Serialized::defaults(flags))
            .extract_lossy()
            .context("invalid configuration")?;
        Ok(config)
    }

    /// Refuses settings that cannot work or are insecure under the profile.
    pub fn check(&self) -> anyhow::Result<()> {
        self.check_database()?;
        if self.queue.lease_timeout_secs == 0 {
            bail!("queue.lease_timeout_secs must be at least 1");
        }
        if self.worker.heartbeat_secs == 0
            || self.worker.heartbeat_secs >= self.queue.lease_timeout_secs
        {
            bail!(
                "worker.heartbeat_secs ({}) must be at least 1 and shorter than queue.lease_timeout_secs ({})",
                self.worker.heartbeat_secs,
                self.queue.lease_timeout_secs
            );
        }
        if self.worker.max_batch == 0 {
            bail!("worker.max_batch must be at least 1");
        }
        let s = &self.scaler;
        if s.target_wait_secs == 0 {
            bail!("scaler.target_wait_secs must be at least 1");
        }
        if !(s.prior_units_per_sec.is_finite() && s.prior_units_per_sec > 0.0) {
            bail!(
                "scaler.prior_units_per_sec must be a positive number; got {}",
                s.prior_units_per_sec
            );
        }
        if !(s.prior_ready_secs.is_finite() && s.prior_ready_secs >= 0.0) {
            bail!(
                "scaler.prior_ready_secs must be seconds, 0 or more; got {}",
                s.prior_ready_secs
            );
        }
        if let Some(max) = s.max_workers.filter(|max| s.min_workers > *max) {
            bail!(
                "scaler.min_workers ({}) is more than scaler.max_workers ({max})",
                s.min_workers
            );
        }
        if let Err(why) = s.gpus.parse::<sparkle_scaler::GpuChoice>() {
            bail!("scaler.gpus: {why}");
        }
        if !["local", "kubernetes", "metric"].contains(&s.actuator.as_str()) {
            bail!(
                "scaler.actuator must be local, kubernetes or metric; got {:?}",
                s.actuator
            );
        }
        if let Some(url) = &self.store.url {
            if !url.starts_with("s3://") || url.len() <= "s3://".len() {
                bail!("store.url must be s3://BUCKET[/PREFIX]; got {url:?}");
            }
            if self
                .store
                .endpoint
                .as_deref()
                .is_some_and(|e| !e.starts_with("https://"))
            {
                bail!("store.endpoint must be https:// (TLS is always verified)");
            }
        } else if self.store.endpoint.is_some() || self.store.credentials_file.is_some() {
            bail!("store.endpoint and store.credentials_file need store.url = \"s3://BUCKET[/PREFIX]\"");
        }
        if !(5..=3600).contains(&self.worker.token_lifetime_secs) {
            bail!(
                "worker.token_lifetime_secs must be 5 to 3600; got {}",
                self.worker.token_lifetime_secs
            );
        }
        if let Err(e) = self.worker.precision.parse::<sparkle_engine::Precision>() {
            bail!("worker.precision: {e}");
        }
        crate::cmd::serve::parse_device(&self.worker.device)?;
        if self.profile == Profile::Production
            && (self.tls.cert_file.is_none() || self.tls.key_file.is_none())
        {
            bail!("the production profile needs tls.cert_file and tls.key_file; self-signed certificates are for the dev profile");
        }
        if self.profile == Profile::Production && !self.discord.api_base.starts_with("https://") {
            bail!(
                "discord.api_base must be an https:// URL under the production profile (got {:?}): plain http would carry tokens and images unencrypted",
                self.discord.api_base
            );
        }
        let w = &self.webhooks;
        if self.profile == Profile::Production && w.allow_private_addresses {
            bail!("webhooks.allow_private_addresses is for tests and closed networks; the production profile refuses it");
        }
        if w.connect_timeout_secs == 0 || w.timeout_secs == 0 {
            bail!("webhooks.connect_timeout_secs and webhooks.timeout_secs must be at least 1");
        }
        if w.retry_delays_secs.len() > 32 || w.retry_delays_secs.iter().any(|&d| d > 7 * 86_400) {
            bail!("webhooks.retry_delays_secs may hold at most 32 delays of at most 7 days each");
        }
        if self.retention.interval_secs == 0 {
            bail!("retention.interval_secs must be at least 1");
        }
        if self.retention.days > 36_500 {
            bail!(
                "retention.days must be at most 36500 (0 keeps jobs forever); got {}",
                self.retention.days
            );
        }
        if self.queue.retry_backoff_secs > 300 {
            bail!(
                "queue.retry_backoff_secs must be at most 300; got {}",
                self.queue.retry_backoff_secs
            );
        }
        let g = &self.gateway;
        if g.max_event_streams == 0 || g.max_event_streams_per_key == 0 {
            bail!("gateway.max_event_streams and gateway.max_event_streams_per_key must be at least 1");
        }
        if g.max_header_bytes < 8192 {
            bail!("gateway.max_header_bytes must be at least 8192");
        }
        for (name, value) in [
            ("max_body_bytes", g.max_body_bytes as u64),
            ("max_image_body_bytes", g.max_image_body_bytes as u64),
            ("handshake_timeout_secs", g.handshake_timeout_secs),
            ("header_timeout_secs", g.header_timeout_secs),
            ("request_timeout_secs", g.request_timeout_secs),
            ("send_timeout_secs", g.send_timeout_secs),
            ("max_connections", g.max_connections as u64),
            ("max_connections_per_ip", g.max_connections_per_ip as u64),
        ] {
            if value == 0 {
                bail!("gateway.{name} must be at least 1");
            }
        }
        if !(1..=MAX_IMAGE_LINK_SECS).contains(&g.image_link_secs) {
            bail!(
                "gateway.image_link_secs must be between 1 and {MAX_IMAGE_LINK_SECS} (7 days); got {}",
                g.image_link_secs
            );
        }
        if !(1..=720).contains(&g.session_hours) {
            bail!(
                "gateway.session_hours must be between 1 and 720 (30 days); got {}",
                g.session_hours
            );
        }
        if let Some(url) = &g.public_url {
            let host = url.strip_prefix("https://").unwrap_or_default();
            if host.is_empty() || host.contains(['?', '#', ' ']) {
                bail!(
                    "gateway.public_url must be an https:// URL without query or fragment, as clients reach the gateway (e.g. https://sparkle.example.com); got {url:?}"
                );
            }
        }
        if !(1..=900).contains(&self.discord.token_lifetime_secs) {
            bail!("discord.token_lifetime_secs must be between 1 and 900 (Discord's lifetime)");
        }
        for guild in self.discord.guilds.keys() {
            // Discord ids (snowflakes) are decimal numbers; anything else would never match.
            if guild.is_empty() || guild.len() > 20 || !guild.bytes().all(|b| b.is_ascii_digit()) {
                bail!("discord.guilds.\"{guild}\": a guild id is a number, as Discord shows it (Copy Server ID)");
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            bail!("tls.cert_file and tls.key_file must be set together");
        }
        Ok(())
    }

    /// How long a signed image link lives.
    pub fn image_link_lifetime(&self) -> Duration {
        Duration::from_secs(self.gateway.image_link_secs)
    }

    /// The base URL of image links: `gateway.public_url` without a trailing slash, or
    /// `https://` and `bound`, the address the listener got.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        match &self.gateway.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("https://{bound}"),
        }
    }

    pub fn lease_timeout(&self) -> Duration {
        Duration::from_secs(self.queue.lease_timeout_secs)
    }

    fn check_database(&self) -> anyhow::Result<()> {
        let db = &self.database;
        let Some(url) = &db.url else {
            if db.ca_file.is_some() || db.password_file.is_some() {
                bail!(
                    "database.ca_file and database.password_file are for a PostgreSQL database.url"
                );
            }
            return Ok(());
        };
        let parsed = sparkle_queue::DatabaseUrl::parse(url)?;
        if self.profile == Profile::Production {
            if !parsed.tls {
                bail!("database.url: sslmode=disable sends queries and passwords in the clear; the production profile refuses it");
            }
            if parsed.has_password {
                bail!("database.url holds a password; the production profile wants it in database.password_file");
            }
        }
        if parsed.tls && db.ca_file.is_none() && parsed.ca_file.is_none() {
            bail!("database.ca_file is needed to verify the database server's certificate (or sslmode=disable in database.url, refused under the production profile)");
        }
        if db.max_connections == Some(0) {
            bail!("database.max_connections must be at least 1");
        }
        Ok(())
    }

    /// Whether there is a database to read: a server is named, or the embedded file exists.
    pub fn database_exists(&self) -> bool {
        self.database.url.is_some() || self.database_path().exists()
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("sparkle.db")
    }

    /// The certificate chain and key the gateway serves, and whether they are the dev
    /// profile's self-signed pair in the data directory (made on first start).
    pub fn certificate_files(&self) -> (PathBuf, PathBuf, bool) {
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone(), false),
            _ => {
                let (cert, key) = sparkle_gateway::tls::self_signed_paths(&self.data_dir);
                (cert, key, true)
            }
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    /// Creates the data directory, owner-only.
    pub fn prepare_data_dir(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir).with_context(|| {
            format!(
                "cannot create the data directory {}",
                self.data_dir.display()
            )
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot restrict {}", self.data_dir.display()))?;
        }
        Ok(())
    }

    /// Every model served, the default first: `model`, then `models`, each directory of
    /// models opened up into its models (sorted by name).
    pub fn model_paths(&self) -> anyhow::Result<Vec<PathBuf>> {
        let Some(first) = &self.model else {
            if self.models.is_empty() {
                bail!("no model configured: pass --model PATH (a diffusers-layout directory or a single-file .safetensors checkpoint; `sparkle model tiny DIR` makes a small test model)");
            }
            bail!("`models` lists more models but `model`, the default, is not set");
        };
        let mut paths = Vec::new();
        for entry in std::iter::once(first).chain(&self.models) {
            for path in models_at(entry)? {
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
        }
        Ok(paths)
    }
}

/// The models at `path`: itself when it is one, else the models in the directory it is.
fn models_at(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() || path.join("model_index.json").is_file() {
        if !path.exists() {
            bail!("no model at {}", path.display());
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path)
        .with_context(|| format!("cannot list the models in {}", path.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.join("model_index.json").is_file()
                || (p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        })
        .collect();
    found.sort();
    if found.is_empty() {
        bail!(
            "{} is neither a model (no model_index.json) nor a directory of models",
            path.display()
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by every test that loads the configuration, so that the `SPARKLE_*` variables
    /// one test sets (in figment's jail) are never seen by another.
    fn env_lock() -> std::sync::MutexGuard<'static, ()> {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `test` with variables set only for it.
    #[allow(clippy::result_large_err)] // figment's test jail returns its own error type
    fn with_env(
        vars: &[(&str, &str)],
        test: impl FnOnce() -> anyhow::Result<Config>,
    ) -> anyhow::Result<Config> {
        let _env = env_lock();
        let mut result = None;
        figment::Jail::expect_with(|jail| {
            for (name, value) in vars {
                jail.set_env(name, value);
            }
            result = Some(test());
            Ok(())
        });
        result.unwrap_or_else(|| unreachable!("the jail runs its closure"))
    }

    fn from_env(vars: &[(&str, &str)]) -> Config {
        with_env(vars, || Config::load(None, &Overrides::default()))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test jail returns its own error type
    fn file_then_environment_then_flags() {
        let _env = env_lock();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sparkle.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1000\"\n[scaler]\nmax_workers = 3\n",
        )
        .expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("SPARKLE_SCALER__MAX_WORKERS", "5");
            let c = Config::load(Some(&file), &Overrides::default()).expect("load");
            assert_eq!((c.listen.port(), c.scaler.max_workers), (1000, Some(5)));
            let flags = Overrides {
                listen: Some("127.0.0.1:2000".parse().expect("addr")),
                ..Default::default()
            };
            let c = Config::load(Some(&file), &flags).expect("load");
            assert_eq!(c.listen.port(), 2000);
            Ok(())
        });
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let _env = env_lock();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sparkle.toml");
        std::fs::write(&file, "[scaler]\nmax_wrokers = 3\n").expect("write");
        let err = Config::load(Some(&file), &Overrides::default()).expect_err("typo");
        assert!(format!("{err:#}").contains("max_wrokers"), "{err:#}");
        std::fs::write(&file, "[worker]\nheartbeat_secs = 90\n").expect("write");
        let err = Config::load(Some(&file), &Overrides::default()).expect_err("heartbeat too slow");
        assert!(format!("{err:#}").contains("heartbeat_secs"), "{err:#}");
        std::fs::write(&file, "profile = \"production\"\n").expect("write");
        let err =
            Config::load(Some(&file), &Overrides::default()).expect_err("production without certs");
        assert!(format!("{err:#}").contains("tls.cert_file"), "{err:#}");
        std::fs::write(
            &file,
            "profile = \"production\"\n[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[discord]\napi_base = \"http://127.0.0.1:9/api\"\n",
        )
        .expect("write");
        let err = Config::load(Some(&file), &Overrides::default()).expect_err("plain-http Discord");
        assert!(format!("{err:#}").contains("discord.api_base"), "{err:#}");
    }

    #[test]
    fn server_policies_override_the_global_one_field_by_field() {
        let _env = env_lock();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sparkle.toml");
        std::fs::write(
            &file,
            r#"
[discord]
allowed_channels = ["600"]
denied_words = ["gore"]
max_jobs_per_user = 3

[discord.guilds."500"]
denied_words = ["gore", "dragon"]
max_jobs_per_user = 1

[discord.guilds."501"]
allowed_channels = []
"#,
        )
        .expect("write");
        let c = Config::load(Some(&file), &Overrides::default()).expect("load");
        let policies = c.discord.policies();
        let a = policies.for_guild(Some("500"));
        assert_eq!(a.allowed_channels, ["600"], "inherited");
        assert_eq!(a.denied_words, ["gore", "dragon"]);
        assert_eq!(a.max_live_per_user, 1);
        let b = policies.for_guild(Some("501"));
        assert!(b.allowed_channels.is_empty(), "every channel of 501");
        assert_eq!(
            (b.denied_words.as_slice(), b.max_live_per_user),
            (&["gore".to_string()][..], 3)
        );
        for elsewhere in [Some("502"), None] {
            let p = policies.for_guild(elsewhere);
            assert_eq!(
                (p.allowed_channels.as_slice(), p.max_live_per_user),
                (&["600".to_string()][..], 3),
                "{elsewhere:?}"
            );
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test jail returns its own error type
    fn a_server_policy_can_come_from_the_environment() {
        let _env = env_lock();
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "SPARKLE_DISCORD__GUILDS__500__DENIED_WORDS",
                r#"["dragon"]"#,
            );
            jail.set_env("SPARKLE_DISCORD__GUILDS__500__MAX_JOBS_PER_USER", "1");
            let c = Config::load(None, &Overrides::default()).expect("load");
            let p = c.discord.policies();
            let a = p.for_guild(Some("500"));
            assert_eq!(
                (a.denied_words.as_slice(), a.max_live_per_user),
                (&["dragon".to_string()][..], 1)
            );
            assert_eq!(p.for_guild(None).max_live_per_user, 3);
            Ok(())
        });
    }

    #[test]
    fn bad_server_policies_are_refused_by_name() {
        let _env = env_lock();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sparkle.toml");
        let cases = [
            (
                "[discord.guilds.\"500\"]\nmax_jobs_per_usr = 1\n",
                "max_jobs_per_usr",
            ),
            (
                "[discord.guilds.\"500\"]\nmax_jobs_per_user = -1\n",
                "max_jobs_per_user",
            ),
            (
                "[discord.guilds.\"500\"]\ndenied_words = \"gore\"\n",
                "denied_words",
            ),
            (
                "[discord.guilds.\"my server\"]\nmax_jobs_per_user = 1\n",
                "my server",
            ),
            ("[discord.guilds.\"\"]\nmax_jobs_per_user = 1\n", "guild id"),
        ];
        for (text, named) in cases {
            std::fs::write(&file, text).expect("write");
            let err = Config::load(Some(&file), &Overrides::default()).expect_err(text);
            assert!(format!("{err:#}").contains(named), "{text}: {err:#}");
        }
    }

    #[test]
    fn discord_ids_and_keys_from_the_environment_arrive_as_written() {
        // A public key is hex, and may be all digits, with a leading zero.
        let all_digits = "0123456789".repeat(6) + "0123";
        let c = from_env(&[
            ("SPARKLE_DISCORD__APPLICATION_ID", "123456789012345678"),
            ("SPARKLE_DISCORD__PUBLIC_KEY", &all_digits),
        ]);
        assert_eq!(
            c.discord.application_id.as_deref(),
            Some("123456789012345678")
        );
        assert_eq!(c.discord.public_key.as_deref(), Some(all_digits.as_str()));
        // Quoted, as figment's syntax has it, still works.
        let c = from_env(&[
            ("SPARKLE_DISCORD__APPLICATION_ID", "\"0042\""),
            ("SPARKLE_DISCORD__PUBLIC_KEY", " 00ff "),
        ]);
        assert_eq!(c.discord.application_id.as_deref(), Some("0042"));
        assert_eq!(c.discord.public_key.as_deref(), Some("00ff"), "trimmed");
    }

    #[test]
    fn lists_of_ids_from_the_environment_keep_every_digit() {
        let c = from_env(&[
            (
                "SPARKLE_DISCORD__GUILDS__123456789012345678__ALLOWED_CHANNELS",
                "[923456789012345678, \"0456\", 18446744073709551615]",
            ),
            (
                "SPARKLE_DISCORD__GUILDS__123456789012345678__DENIED_WORDS",
                "[1984, true, gore]",
            ),
            (
                "SPARKLE_DISCORD__GUILDS__123456789012345678__MAX_JOBS_PER_USER",
                "1",
            ),
        ]);
        let guild = &c.discord.guilds["123456789012345678"];
        assert_eq!(
            guild.allowed_channels.as_deref(),
            Some(&["923456789012345678", "0456", "18446744073709551615"].map(String::from)[..])
        );
        assert_eq!(
            guild.denied_words.as_deref(),
            Some(&["1984", "true", "gore"].map(String::from)[..])
        );
        assert_eq!(guild.max_jobs_per_user, Some(1));
        // As the README writes it.
        let c = from_env(&[(
            "SPARKLE_DISCORD__ALLOWED_CHANNELS",
            "[123456789012345678, 234567890123456789]",
        )]);
        assert_eq!(
            c.discord.allowed_channels,
            ["123456789012345678", "234567890123456789"]
        );
    }

    #[test]
    fn the_readmes_environment_examples_load() {
        let c = from_env(&[
            ("SPARKLE_SCALER__MAX_WORKERS", "2"),
            ("SPARKLE_ADMIN_LISTEN", "0.0.0.0:9464"),
            ("SPARKLE_DISCORD__GUILDS__123__MAX_JOBS_PER_USER", "1"),
            // Read by the engine, not a setting: no "unknown field".
            ("SPARKLE_FLASH_ATTENTION", "0"),
            ("SPARKLE_FLASH_ROWS", "1"),
            (
                "SPARKLE_GATEWAY__PUBLIC_URL",
                "https://sparkle.example.com/",
            ),
            ("SPARKLE_GATEWAY__IMAGE_LINK_SECS", "600"),
        ]);
        assert_eq!(c.scaler.max_workers, Some(2));
        assert_eq!(c.admin_listen, "0.0.0.0:9464".parse().expect("addr"));
        assert_eq!(c.discord.guilds["123"].max_jobs_per_user, Some(1));
        assert_eq!(c.image_link_lifetime(), Duration::from_secs(600));
        let bound = "127.0.0.1:4443".parse().expect("addr");
        assert_eq!(c.public_url(bound), "https://sparkle.example.com");
    }

    #[test]
    fn numbers_flags_and_paths_from_the_environment_take_their_settings_type() {
        let c = from_env(&[
            ("SPARKLE_LIMITS__MAX_GUIDANCE_SCALE", "12.5"),
            ("SPARKLE_QUEUE__MAX_QUEUED_JOBS", "0010"),
            ("SPARKLE_MODEL", "2024"),
            ("SPARKLE_DATA_DIR", "0123"),
            ("SPARKLE_WORKER__DEVICE", "cpu"),
            ("SPARKLE_PROFILE", "dev"),
        ]);
        assert_eq!(c.limits.max_guidance_scale, 12.5);
        assert_eq!(c.queue.max_queued_jobs, 10);
        assert_eq!(c.model.as_deref(), Some(Path::new("2024")));
        assert_eq!(c.data_dir, Path::new("0123"));
        let err = with_env(&[("SPARKLE_SCALER__MAX_WORKERS", "two")], || {
            Config::load(None, &Overrides::default())
        })
        .expect_err("not a number");
        let shown = format!("{err:#}");
        assert!(
            shown.contains("two") && shown.contains("MAX_WORKERS"),
            "{shown}"
        );
    }

    #[test]
    fn image_link_settings_are_checked_at_start_up() {
        let _env = env_lock();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sparkle.toml");
        let c = Config::load(None, &Overrides::default()).expect("defaults");
        assert_eq!(c.image_link_lifetime(), Duration::from_secs(3600));
        let bound = "127.0.0.1:40001".parse().expect("addr");
        assert_eq!(c.public_url(bound), "https://127.0.0.1:40001");
        let v6 = "[::1]:8443".parse().expect("addr");
        assert_eq!(c.public_url(v6), "https://[::1]:8443");
        for (text, named) in [
            (
                "[gateway]\nimage_link_secs = 0\n",
                "gateway.image_link_secs",
            ),
            ("[gateway]\nimage_link_secs = 604801\n", "7 days"),
            ("[gateway]\nsession_hours = 0\n", "gateway.session_hours"),
            ("[gateway]\nsession_hours = 721\n", "30 days"),
            (
                "[gateway]\npublic_url = \"http://example.com\"\n",
                "gateway.public_url",
            ),
            (
                "[gateway]\npublic_url = \"https://\"\n",
                "gateway.public_url",
            ),
            (
                "[gateway]\npublic_url = \"https://a.example?x=1\"\n",
                "gateway.public_url",
            ),
        ] {
            std::fs::write(&file, text).expect("write");
            let err = Config::load(Some(&file), &Overrides::default()).expect_err(text);
            assert!(format!("{err:#}").contains(named), "{text}: {err:#}");
        }
        std::fs::write(&file, "[gateway]\nimage_link_secs = 604800\n").expect("write");
        let week = Config::load(Some(&file), &Overrides::default()).expect("a week is allowed");
        assert_eq!(week.image_link_lifetime(), Duration::from_secs(604_800));
    }
}
