//! The server roles: `up` (everything), `gateway`, `worker`, `scaler`.

use super::{catalog, load_config, open_queue, open_queue_with};
use crate::config::Config;
use crate::{runtime, Common, Serve};
use anyhow::Context;
use sparkle_gateway::{GatewayOptions, GatewayState};
use sparkle_queue::{Database, JobQueue, Scope};
use sparkle_scaler::{LocalProcesses, Policy};
use sparkle_seal::MasterKeys;
use sparkle_store::{ImageLinks, ImageStore};
use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DRAIN: Duration = Duration::from_secs(30);
/// How long answers in flight may take to finish once the gateway stops.
const DELIVERY_DRAIN: Duration = Duration::from_secs(10);

pub async fn up(common: Common, serve: Serve) -> anyhow::Result<()> {
    let config = load_config(&common, Some(&serve))?;
    config.model_paths()?;
    let keys = crate::keyring::open(&config)?;
    let queue = open_queue_with(&config, keys.clone()).await?;
    ensure_admin_key(&*queue).await?;
    let shutdown = runtime::shutdown_on_signals();
    let admin = crate::admin::start(config.admin_listen, shutdown.clone()).await?;
    let no_workers = (config.scaler.max_workers == Some(0)).then(|| {
        "not ready: scaler.max_workers is 0, so no worker will run the jobs accepted".to_string()
    });
    let (gateway, local) = start_gateway(
        &config,
        queue.clone(),
        keys,
        no_workers,
        true,
        shutdown.clone(),
    )
    .await?;
    let local = local.context("the loopback worker listener")?;
    let scaler = start_scaler(&config, &common, queue, &local.args(), shutdown.clone()).await?;
    let served = gateway.await.context("gateway task")?;
    shutdown.cancel();
    scaler.await.context("scaler task")?;
    admin.await.context("admin task")?;
    served
}

pub async fn gateway(common: Common, serve: Serve) -> anyhow::Result<()> {
    let config = load_config(&common, Some(&serve))?;
    let keys = crate::keyring::open(&config)?;
    let queue = open_queue_with(&config, keys.clone()).await?;
    ensure_admin_key(&*queue).await?;
    let shutdown = runtime::shutdown_on_signals();
    let _admin = crate::admin::start(config.admin_listen, shutdown.clone()).await?;
    // Workers run elsewhere, started by a scaler this process does not know of.
    start_gateway(&config, queue, keys, None, false, shutdown)
        .await?
        .0
        .await
        .context("gateway task")?
}

pub async fn scaler(common: Common, serve: Serve, remote: RemoteWorker) -> anyhow::Result<()> {
    let config = load_config(&common, Some(&serve))?;
    let plane = match config.scaler.actuator.as_str() {
        "local" => {
            config.model_paths()?;
            remote.args().context(
                "the scaler's local workers need a control plane: --control-plane and \
                 --enrollment-token-file (or scaler.actuator = \"kubernetes\" or \"metric\")",
            )?
        }
        _ => Vec::new(),
    };
    let queue = open_queue(&config).await?;
    let shutdown = runtime::shutdown_on_signals();
    let _admin = crate::admin::start(config.admin_listen, shutdown.clone()).await?;
    start_scaler(&config, &common, queue, &plane, shutdown)
        .await?
        .await
        .context("scaler task")
}

/// Where a worker finds its control plane: the worker protocol is all it speaks.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteWorker {
    /// The control plane's worker listener, `https://HOST:PORT` (`worker_listen`).
    #[arg(long, value_name = "URL", requires = "enrollment_token_file")]
    control_plane: Option<String>,
    /// The enrollment secret (`sparkle enrollment create`), in a file readable by this user
    /// alone.
    #[arg(long, value_name = "FILE", requires = "control_plane")]
    enrollment_token_file: Option<std::path::PathBuf>,
    /// The CA that signed the control plane's certificate; unset: the system's roots.
    #[arg(long, value_name = "FILE", requires = "control_plane")]
    ca_file: Option<std::path::PathBuf>,
}

impl RemoteWorker {
    /// These flags again, for the workers a scaler starts; `None` when no control plane
    /// is named.
    fn args(&self) -> Option<Vec<OsString>> {
        let (url, file) = (
            self.control_plane.as_ref()?,
            self.enrollment_token_file.as_ref()?,
        );
        let mut args: Vec<OsString> = vec![
            "--control-plane".into(),
            url.into(),
            "--enrollment-token-file".into(),
            file.into(),
        ];
        if let Some(ca) = &self.ca_file {
            args.extend(["--ca-file".into(), ca.into()]);
        }
        Some(args)
    }
}

pub async fn worker(
    common: Common,
    serve: Serve,
    remote: RemoteWorker,
    stop_on_stdin_eof: bool,
) -> anyhow::Result<()> {
    let config = load_config(&common, Some(&serve))?;
    let models = config
        .model_paths()?
        .into_iter()
        .map(|path| {
            sparkle_worker::ModelSource::describe(path.clone())
                .with_context(|| format!("cannot read the model at {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (Some(url), Some(file)) = (&remote.control_plane, &remote.enrollment_token_file) else {
        anyhow::bail!(
            "a worker speaks only the worker protocol: give --control-plane https://HOST:PORT \
             (the control plane's worker_listen) and --enrollment-token-file FILE \
             (from `sparkle enrollment create`)"
        );
    };
    let secret = crate::secrets::read_secret_file(file)
        .with_context(|| format!("--enrollment-token-file {}", file.display()))?;
    let plane: Arc<dyn sparkle_worker::ControlPlane> = Arc::new(
        sparkle_worker::Remote::new(url, remote.ca_file.as_deref(), secret.to_string())
            .map_err(|e| anyhow::anyhow!("--control-plane: {e}"))?,
    );
    let shutdown = runtime::shutdown_on_signals();
    if stop_on_stdin_eof {
        stop_when_stdin_closes(shutdown.clone());
    }
    let options = sparkle_engine::EngineOptions {
        device: parse_device(&config.worker.device)?,
        precision: config
            .worker
            .precision
            .parse()
            .map_err(|e| anyhow::anyhow!("worker.precision: {e}"))?,
    };
    let engine =
        sparkle_worker::EngineThread::start(models, options, config.worker.max_loaded_models)
            .await
            .context("cannot load the model")?;
    let worker_options = sparkle_worker::WorkerOptions {
        worker_id: format!("{}:{}", hostname(), std::process::id()),
        lease_timeout: config.lease_timeout(),
        heartbeat_interval: Duration::from_secs(config.worker.heartbeat_secs),
        max_batch: config.worker.max_batch,
        drain_timeout: Duration::from_secs(config.worker.drain_timeout_secs),
        batch_wait: Duration::from_millis(config.worker.batch_wait_ms),
        max_job: (config.queue.max_job_secs > 0)
            .then(|| Duration::from_secs(config.queue.max_job_secs)),
        max_pixels: (config.worker.max_pixels > 0).then_some(config.worker.max_pixels),
    };
    if stop_on_stdin_eof {
        // The scaler that started this worker times its start by this line.
        println!("{}", sparkle_scaler::READY_LINE);
    }
    sparkle_worker::run(plane, engine, worker_options, shutdown).await?;
    Ok(())
}

pub fn parse_device(text: &str) -> anyhow::Result<sparkle_engine::DeviceChoice> {
    use sparkle_engine::DeviceChoice;
    Ok(match text.trim() {
        "auto" => DeviceChoice::Auto,
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => DeviceChoice::Cuda(n),
            None => anyhow::bail!("worker.device must be auto, cpu, cuda or cuda:N; got {other:?}"),
        },
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The parent holds our standard input open; end-of-file means it wants us gone (or died).
fn stop_when_stdin_closes(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        tracing::info!("parent closed our input: draining");
        shutdown.cancel();
    });
}

/// On a database without keys, creates an admin key and prints it, once.
async fn ensure_admin_key(queue: &dyn Database) -> anyhow::Result<()> {
    if !queue.list_keys().await?.is_empty() {
        return Ok(());
    }
    let (key, secret) = queue.create_key("admin", &[Scope::Admin]).await?;
    println!(
        "Admin API key (shown once; only its hash is stored): {}",
        secret.expose()
    );
    tracing::info!(key = %key.id, "created the first admin key");
    Ok(())
}

async fn start_gateway(
    config: &Config,
    queue: Arc<dyn Database>,
    keys: Arc<MasterKeys>,
    no_workers: Option<String>,
    local_workers: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<(JoinHandle<anyhow::Result<()>>, Option<LocalPlane>)> {
    let catalog = catalog(&config.model_paths()?)?;
    let (cert, key, self_signed) = config.certificate_files();
    if self_signed {
        let mut names = vec![hostname()];
        let addresses = std::iter::once(config.listen).chain(config.worker_listen);
        for ip in addresses.map(|a| a.ip()) {
            if !ip.is_unspecified() && !ip.is_loopback() {
                names.push(ip.to_string());
            }
        }
        sparkle_gateway::tls::ensure_self_signed(&config.data_dir, &names)
            .context("cannot make a self-signed certificate")?;
    }
    crate::audit::gather(config, crate::audit::Depth::Startup)
        .await
        .refuse_critical()?;
    let certificate = sparkle_gateway::tls::ReloadingCertificate::new(
        &cert,
        &key,
        Duration::from_secs(config.tls.reload_secs.max(1)),
    )
    .map_err(|why| anyhow::anyhow!("cannot load the certificate: {why}"))?;
    let tls = sparkle_gateway::tls::server_config(Arc::new(certificate))
        .context("cannot configure TLS")?;
    let links = Arc::new(ImageLinks::new(keys.clone(), config.image_link_lifetime()));
    let store: Arc<dyn ImageStore> = Arc::new(super::open_store(config, keys.clone())?);
    let plane = crate::worker_listener::WorkerApi {
        plane: Arc::new(crate::control_plane::QueuePlane::new(
            queue.clone() as Arc<dyn JobQueue>,
            store.clone(),
            catalog.models.iter().map(|m| m.name.clone()).collect(),
        )),
        keys: queue.clone(),
        tokens: Arc::new(sparkle_store::WorkerTokens::new(
            keys.clone(),
            Duration::from_secs(config.worker.token_lifetime_secs),
        )),
    };
    if let Some(addr) = config.worker_listen {
        let bound = start_worker_listener(config, addr, &plane, tls.clone(), &shutdown)?;
        println!("Worker listener at https://{bound}");
    }
    let local = match local_workers {
        true => Some(start_local_plane(config, &queue, &plane, &shutdown).await?),
        false => None,
    };
    let discord = match &config.discord.public_key {
        None => None,
        Some(key) => {
            let verifier =
                sparkle_discord::Verifier::new(key, config.discord.timestamp_window_secs)
                    .map_err(|e| anyhow::anyhow!("discord.public_key: {e}"))?;
            let key_file = config
                .discord
                .button_key_file
                .clone()
                .unwrap_or_else(|| config.data_dir.join("discord-button.key"));
            let key = crate::secrets::load_or_create_key(&key_file, 32)?;
            let buttons = sparkle_discord::ButtonSigner::new(&key)
                .map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
            Some(Arc::new(sparkle_gateway::DiscordEndpoint {
                verifier,
                buttons: Arc::new(buttons),
                token_lifetime: Duration::from_secs(config.discord.token_lifetime_secs),
                policy: config.discord.policies(),
                rates: sparkle_gateway::DiscordRates::new(
                    (
                        config.discord.per_user_requests_per_sec,
                        config.discord.per_user_burst,
                    ),
                    (
                        config.discord.per_guild_requests_per_sec,
                        config.discord.per_guild_burst,
                    ),
                ),
                files: sparkle_discord::AttachedFiles::new(
                    config.discord.attachment_hosts.clone(),
                    config.profile == crate::config::Profile::Production,
                )
                .map_err(|e| anyhow::anyhow!("the client for Discord's attachments: {e}"))?,
            }))
        }
    };
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let public_url = config.public_url(addr);
    if config.gateway.public_url.is_none() && addr.ip().is_unspecified() {
        tracing::warn!(%public_url, "image links name an unspecified address; set gateway.public_url to the address clients reach");
    }
    let g = &config.gateway;
    let options = Arc::new(GatewayOptions {
        max_body_bytes: g.max_body_bytes,
        max_image_body_bytes: g.max_image_body_bytes.max(g.max_body_bytes),
        max_attempts: config.queue.max_attempts,
        max_queued_jobs: config.queue.max_queued_jobs,
        sync_timeout: Duration::from_secs(config.queue.sync_timeout_secs),
        request_timeout: Duration::from_secs(g.request_timeout_secs),
        per_ip_requests_per_sec: g.per_ip_requests_per_sec,
        per_ip_burst: g.per_ip_burst,
        per_key_requests_per_sec: g.per_key_requests_per_sec,
        per_key_burst: g.per_key_burst,
        max_live_jobs_per_key: g.max_live_jobs_per_key,
        max_event_streams: g.max_event_streams,
        max_event_streams_per_key: g.max_event_streams_per_key,
        public_url,
        no_workers,
        session_ttl: Duration::from_secs(g.session_hours * 3600),
    });
    let listener_options = sparkle_gateway::ListenerOptions {
        drain: DRAIN,
        handshake_timeout: Duration::from_secs(g.handshake_timeout_secs),
        header_timeout: Duration::from_secs(g.header_timeout_secs),
        send_timeout: Duration::from_secs(g.send_timeout_secs),
        max_header_bytes: g.max_header_bytes,
        max_connections: g.max_connections,
        max_connections_per_ip: g.max_connections_per_ip,
    };
    let events = sparkle_delivery::events::JobEvents::new(
        queue.clone() as Arc<dyn JobQueue>,
        sparkle_delivery::events::EventOptions::default(),
    );
    tokio::spawn(events.clone().run(shutdown.clone()));
    let state = GatewayState {
        queue: queue.clone() as Arc<dyn JobQueue>,
        keys: queue.clone(),
        store,
        links,
        catalog: Arc::new(catalog),
        limits: Arc::new(config.limits.clone()),
        options: options.clone(),
        discord,
        admission: Arc::new(sparkle_gateway::Admission::new(&options)),
        events,
        outbox: queue.clone(),
        streams: sparkle_gateway::StreamPermits::new(
            g.max_event_streams,
            g.max_event_streams_per_key,
        ),
        webhooks: sparkle_delivery::webhook::UrlPolicy {
            require_https: config.profile == crate::config::Profile::Production,
            allow_private_addresses: config.webhooks.allow_private_addresses,
        },
    };
    println!("Sparkle is up at https://{addr}");
    tracing::info!(%addr, certificate = %cert.display(), "gateway listening");
    let deliveries = start_delivery(config, &state, queue.clone(), shutdown.clone())?;
    tokio::spawn(crate::retention::run(
        state.queue.clone(),
        state.store.clone(),
        config.retention.days,
        Duration::from_secs(config.retention.interval_secs),
        shutdown.clone(),
    ));
    let router = sparkle_gateway::router(state);
    let served = tokio::spawn(async move {
        let served = sparkle_gateway::serve_tls(listener, tls, router, shutdown, &listener_options)
            .await
            .context("gateway");
        // Answers in flight finish within the drain deadline; the rest wait in the outbox.
        let drained = tokio::time::timeout(DELIVERY_DRAIN, futures::future::join_all(deliveries));
        if drained.await.is_err() {
            tracing::warn!("delivery did not finish within its drain deadline; unfinished answers stay in the outbox");
        }
        served
    });
    Ok((served, local))
}

/// The worker protocol on its own listener; the address it is bound to.
fn start_worker_listener(
    config: &Config,
    addr: std::net::SocketAddr,
    api: &crate::worker_listener::WorkerApi,
    tls: sparkle_gateway::RustlsConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} (worker_listen)"))?;
    let bound = listener.local_addr()?;
    let g = &config.gateway;
    let options = sparkle_gateway::ListenerOptions {
        drain: DRAIN,
        handshake_timeout: Duration::from_secs(g.handshake_timeout_secs),
        header_timeout: Duration::from_secs(g.header_timeout_secs),
        // A completion carries a job's images; a long poll waits up to 30 s for work.
        send_timeout: Duration::from_secs(g.send_timeout_secs.max(60)),
        max_header_bytes: g.max_header_bytes,
        max_connections: g.max_connections,
        max_connections_per_ip: g.max_connections,
    };
    tracing::info!(addr = %bound, "worker listener");
    let router = crate::worker_listener::router(api.clone());
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = sparkle_gateway::serve_tls(listener, tls, router, shutdown, &options).await
        {
            tracing::error!(error = %e, "a worker listener stopped");
        }
    });
    Ok(bound)
}

/// How the local workers of `sparkle up` reach their control plane: the worker protocol on
/// a loopback listener of its own, with a certificate of its own (whatever the public one
/// names), and an enrollment made for this run (the one of the run before is revoked).
pub struct LocalPlane {
    pub url: String,
    pub ca_file: std::path::PathBuf,
    pub secret_file: std::path::PathBuf,
}

impl LocalPlane {
    fn args(&self) -> Vec<OsString> {
        vec![
            "--control-plane".into(),
            self.url.clone().into(),
            "--enrollment-token-file".into(),
            self.secret_file.clone().into(),
            "--ca-file".into(),
            self.ca_file.clone().into(),
        ]
    }
}

/// The name of the enrollment `sparkle up` makes for its local workers.
const LOCAL_ENROLLMENT: &str = "local workers (sparkle up)";

pub(crate) async fn start_local_plane(
    config: &Config,
    queue: &Arc<dyn Database>,
    api: &crate::worker_listener::WorkerApi,
    shutdown: &CancellationToken,
) -> anyhow::Result<LocalPlane> {
    let dir = config.data_dir.join("loopback");
    let (cert, key) = sparkle_gateway::tls::ensure_self_signed(&dir, &[])
        .context("cannot make the loopback worker listener's certificate")?;
    let certificate = sparkle_gateway::tls::ReloadingCertificate::new(
        &cert,
        &key,
        Duration::from_secs(config.tls.reload_secs.max(1)),
    )
    .map_err(|why| anyhow::anyhow!("the loopback certificate: {why}"))?;
    let tls = sparkle_gateway::tls::server_config(Arc::new(certificate))
        .context("cannot configure the loopback listener's TLS")?;
    for earlier in queue.list_keys().await? {
        if earlier.name == LOCAL_ENROLLMENT
            && earlier.scopes.contains(&sparkle_queue::Scope::Worker)
            && !earlier.revoked
        {
            queue.revoke_key(&earlier.id).await?;
        }
    }
    let (_, secret) = queue
        .create_key(LOCAL_ENROLLMENT, &[sparkle_queue::Scope::Worker])
        .await?;
    let secret_file = dir.join("enrollment.secret");
    crate::secrets::write_secret_file(&secret_file, format!("{}\n", secret.expose()).as_bytes())?;
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let bound = start_worker_listener(config, loopback, api, tls, shutdown)?;
    Ok(LocalPlane {
        url: format!("https://{bound}"),
        ca_file: cert,
        secret_file,
    })
}

/// Starts the delivery channels (Discord when configured, webhooks always) and the outbox's
/// backlog metrics; each stops at `shutdown`, finishing the attempts it has in flight.
fn start_delivery(
    config: &Config,
    state: &GatewayState,
    queue: Arc<dyn Database>,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    use sparkle_delivery::{channel, discord, webhooks, ChannelOptions, ReplyChannel};
    let mut channels: Vec<Arc<dyn ReplyChannel>> = Vec::new();
    if state.discord.is_some() {
        let bot_token = match &config.discord.bot_token_file {
            Some(file) => Some(Arc::new(crate::secrets::read_secret_file(file)?)),
            None => None,
        };
        channels.push(Arc::new(discord::DiscordChannel {
            queue: state.queue.clone(),
            store: state.store.clone(),
            discord: Arc::new(
                sparkle_discord::DiscordRest::new(&config.discord.api_base)
                    .map_err(|e| anyhow::anyhow!("discord.api_base: {e}"))?,
            ),
            bot_token,
            buttons: state.discord.as_ref().map(|d| d.buttons.clone()),
            options: discord::DiscordOptions {
                // A minute's notice, or half of a shortened lifetime.
                deadline_margin: Duration::from_millis(
                    60_000.min(config.discord.token_lifetime_secs * 500),
                ),
                ..discord::DiscordOptions::default()
            },
        }));
    }
    let w = &config.webhooks;
    let client = sparkle_delivery::webhook::WebhookClient::new(
        state.webhooks,
        Duration::from_secs(w.connect_timeout_secs),
        Duration::from_secs(w.timeout_secs),
    )
    .context("cannot set up the webhook client")?;
    channels.push(Arc::new(webhooks::WebhookChannel {
        client,
        keys: queue.clone(),
        images: image_views(state),
        schedule: sparkle_delivery::webhook::RetrySchedule::new(
            w.retry_delays_secs
                .iter()
                .map(|&s| Duration::from_secs(s))
                .collect(),
        ),
        policy: state.webhooks,
    }));
    let mut tasks = Vec::new();
    for channel in channels {
        tasks.push(tokio::spawn(channel::run_channel(
            channel,
            queue.clone(),
            state.queue.clone(),
            state.events.clone(),
            ChannelOptions::default(),
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(channel::report_backlog(
        queue,
        Duration::from_secs(5),
        shutdown,
    )));
    Ok(tasks)
}

/// How webhooks show a succeeded job's images: signed links, as the job's view has them.
fn image_views(state: &GatewayState) -> sparkle_delivery::webhooks::ImageViews {
    let state = state.clone();
    Arc::new(move |job| {
        sparkle_gateway::image_views(&state, job)
            .iter()
            .map(|view| serde_json::to_value(view).unwrap_or_default())
            .collect()
    })
}

async fn start_scaler(
    config: &Config,
    common: &Common,
    queue: Arc<dyn Database>,
    plane: &[OsString],
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let s = &config.scaler;
    let (actuator, max_workers): (Box<dyn sparkle_scaler::Actuator>, u32) =
        match s.actuator.as_str() {
            "metric" => (
                Box::new(sparkle_scaler::MetricOnly::default()),
                s.max_workers.unwrap_or(1),
            ),
            "kubernetes" => {
                let client = sparkle_scaler::KubernetesDeployment::connect()
                    .await
                    .context("scaler.actuator = \"kubernetes\"")?;
                let workers = sparkle_scaler::KubernetesDeployment::new(
                    client,
                    s.kubernetes_namespace.as_deref(),
                    &s.kubernetes_deployment,
                );
                (Box::new(workers), s.max_workers.unwrap_or(1))
            }
            _ => {
                let (local, max) = local_workers(config, common, plane)?;
                (Box::new(local), max)
            }
        };
    let policy = Policy {
        min_workers: s.min_workers.min(max_workers),
        max_workers,
        target_wait_secs: s.target_wait_secs as f64,
        idle_grace_secs: s.idle_grace_secs as f64,
        budget_gpu_secs_per_hour: (s.budget_gpu_secs_per_hour > 0)
            .then_some(s.budget_gpu_secs_per_hour as f64),
    };
    let priors = sparkle_scaler::Priors {
        units_per_sec: s.prior_units_per_sec,
        ready_secs: s.prior_ready_secs,
    };
    let tick = Duration::from_millis(s.tick_ms.max(100));
    let drain = Duration::from_secs(config.worker.drain_timeout_secs) + Duration::from_secs(5);
    Ok(tokio::spawn(sparkle_scaler::run(
        queue,
        policy.decider(),
        actuator,
        priors,
        tick,
        drain,
        shutdown,
    )))
}

/// Local worker processes, one per GPU chosen (or on the CPU), and how many may run.
fn local_workers(
    config: &Config,
    common: &Common,
    plane: &[OsString],
) -> anyhow::Result<(LocalProcesses, u32)> {
    let program = std::env::current_exe().context("cannot find the sparkle executable")?;
    let mut args: Vec<OsString> = vec!["worker".into(), "--stop-on-stdin-eof".into()];
    args.extend(plane.iter().cloned());
    if let Some(file) = &common.config {
        args.extend(["--config".into(), file.clone().into_os_string()]);
    }
    args.extend([
        "--data-dir".into(),
        config.data_dir.clone().into_os_string(),
    ]);
    for model in config.model_paths()? {
        args.extend(["--model".into(), model.into_os_string()]);
    }
    let s = &config.scaler;
    let choice: sparkle_scaler::GpuChoice = s
        .gpus
        .parse()
        .map_err(|why| anyhow::anyhow!("scaler.gpus: {why}"))?;
    let found = match choice {
        sparkle_scaler::GpuChoice::None => Vec::new(),
        _ => sparkle_scaler::gpus::discover("nvidia-smi"),
    };
    let mut gpus = sparkle_scaler::gpus::choose(&found, &choice)
        .map_err(|why| anyhow::anyhow!("scaler.gpus: {why}"))?;
    if !gpus.is_empty() && !sparkle_engine::CUDA {
        // Workers pinned to a GPU would run on it; this build cannot.
        tracing::warn!(
            gpus = gpus.len(),
            "this sparkle was built without CUDA (cargo build --features cuda): the GPUs found are left alone and workers run on the CPU"
        );
        gpus.clear();
    }
    for gpu in &gpus {
        tracing::info!(index = gpu.index, name = %gpu.name, memory_mib = gpu.memory_mib, "a GPU for a local worker");
    }
    let max_workers = s.max_workers.unwrap_or((gpus.len() as u32).max(1));
    Ok((
        LocalProcesses::new(program, args).on_gpus(gpus),
        max_workers,
    ))
}
