//! `sparkle bench ingress`: requests acknowledged per second through a running gateway's real
//! listener (TLS, limits, authentication, the durable commit), with latency percentiles.

use anyhow::bail;
use clap::{Args, ValueEnum};
use ed25519_dalek::{Signer, SigningKey};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Ingress {
    /// `POST /v1/jobs` with the API key.
    Rest,
    /// Signed `/sparkle` interactions on `POST /discord/interactions`, each from its own
    /// user (the service must trust the key in `--discord-key-file`).
    Discord,
    /// `GET /readyz`, ready or not.
    Readyz,
}

#[derive(Debug, Args)]
pub struct IngressBench {
    #[command(flatten)]
    gateway: super::GatewayArgs,
    /// What to send.
    #[arg(long, value_enum, default_value = "rest")]
    kind: Ingress,
    /// Timed requests.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight at once (one connection each).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// REST submits made first, untimed, to measure at a queue depth.
    #[arg(long, default_value_t = 0)]
    preload: usize,
    /// File holding the hex Ed25519 seed (32 bytes) Discord requests are signed with; made
    /// if missing. `--print-discord-public-key` prints its public key, which the service's
    /// `discord.public_key` must be.
    #[arg(long, value_name = "FILE")]
    discord_key_file: Option<PathBuf>,
    /// Print the public key of `--discord-key-file` and exit.
    #[arg(long)]
    print_discord_public_key: bool,
}

pub async fn run(args: IngressBench) -> anyhow::Result<()> {
    let signing = match &args.discord_key_file {
        Some(file) => Some(discord_key(file)?),
        None => None,
    };
    if args.print_discord_public_key {
        let Some(key) = &signing else {
            bail!("--print-discord-public-key needs --discord-key-file");
        };
        println!("{}", hex::encode(key.verifying_key().to_bytes()));
        return Ok(());
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.kind == Ingress::Discord && signing.is_none() {
        bail!("--kind discord needs --discord-key-file");
    }
    let (key, client) = args
        .gateway
        .client(args.concurrency, Some(Duration::from_secs(60)))?;
    let target = Arc::new(Target {
        client,
        base: args.gateway.base().to_string(),
        key: key.as_str().to_string(),
        signing,
    });
    if args.preload > 0 {
        let run = drive(&target, Ingress::Rest, args.preload, args.concurrency, 0).await;
        println!(
            "preloaded {} submits in {:.1} s ({:.0}/s); refused: {:?}",
            run.ok,
            run.elapsed.as_secs_f64(),
            run.ok as f64 / run.elapsed.as_secs_f64(),
            run.refused
        );
    }
    let run = drive(
        &target,
        args.kind,
        args.requests,
        args.concurrency,
        args.preload,
    )
    .await;
    let mut latencies = run.latencies;
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{:?}: {} acknowledged in {:.2} s, {} at a time, after {} preloaded: {:.0}/s; latency p50 {:.1?}, p99 {:.1?}, max {:.1?}; refused: {:?}",
        args.kind,
        run.ok,
        run.elapsed.as_secs_f64(),
        args.concurrency,
        args.preload,
        run.ok as f64 / run.elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or_default(),
        run.refused
    );
    Ok(())
}

struct Target {
    client: reqwest::Client,
    base: String,
    key: String,
    signing: Option<SigningKey>,
}

struct Run {
    ok: usize,
    refused: BTreeMap<String, usize>,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

/// Sends `total` requests of `kind`, `concurrency` at a time; request numbers start at
/// `first` (prompts and Discord users differ per request).
async fn drive(
    target: &Arc<Target>,
    kind: Ingress,
    total: usize,
    concurrency: usize,
    first: usize,
) -> Run {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..concurrency.min(total.max(1)) {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            let mut refused = BTreeMap::<String, usize>::new();
            let mut latencies = Vec::new();
            for n in (lane..total).step_by(concurrency) {
                let t = Instant::now();
                match target.send(kind, first + n).await {
                    Ok(()) => {
                        ok += 1;
                        latencies.push(t.elapsed());
                    }
                    Err(why) => *refused.entry(why).or_default() += 1,
                }
            }
            (ok, refused, latencies)
        }));
    }
    let mut run = Run {
        ok: 0,
        refused: BTreeMap::new(),
        latencies: Vec::with_capacity(total),
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        if let Ok((ok, refused, latencies)) = task.await {
            run.ok += ok;
            for (why, n) in refused {
                *run.refused.entry(why).or_default() += n;
            }
            run.latencies.extend(latencies);
        }
    }
    run.elapsed = started.elapsed();
    run
}

impl Target {
    async fn send(&self, kind: Ingress, n: usize) -> Result<(), String> {
        let request = match kind {
            Ingress::Rest => self
                .client
                .post(format!("{}/v1/jobs", self.base))
                .bearer_auth(&self.key)
                .json(&serde_json::json!({
                    "prompt": format!("a corgi, number {n}"), "size": "64x64", "steps": 2
                })),
            Ingress::Discord => {
                let body = serde_json::json!({
                    "id": format!("{}", 10_000_000 + n), "application_id": "1", "type": 2,
                    "token": format!("bench-token-{n}"), "version": 1, "channel_id": "2",
                    "guild_id": "3",
                    "member": {"user": {"id": format!("{}", 100_000 + n), "username": "bench"}, "roles": []},
                    "data": {"id": "4", "name": "sparkle", "type": 1, "options": [
                        {"name": "prompt", "type": 3, "value": format!("a corgi, number {n}")}
                    ]},
                })
                .to_string();
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    .to_string();
                let Some(key) = &self.signing else {
                    return Err("no signing key".into());
                };
                let signature = hex::encode(key.sign(format!("{ts}{body}").as_bytes()).to_bytes());
                self.client
                    .post(format!("{}/discord/interactions", self.base))
                    .header("content-type", "application/json")
                    .header("x-signature-ed25519", signature)
                    .header("x-signature-timestamp", ts)
                    .body(body)
            }
            Ingress::Readyz => self.client.get(format!("{}/readyz", self.base)),
        };
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                "connect".to_string()
            } else {
                "transport".to_string()
            }
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|_| "body".to_string())?;
        let acknowledged = match kind {
            Ingress::Rest => status.as_u16() == 202,
            // Discord is answered 200 either way; a queued command names its job.
            Ingress::Discord => status.is_success() && body.windows(9).any(|w| w == b"Submitted"),
            // Answered either way: ready, or not (a service without workers is not ready).
            Ingress::Readyz => {
                status.is_success() || body.windows(13).any(|w| w == b"\"unavailable\"")
            }
        };
        if acknowledged {
            Ok(())
        } else {
            Err(status.as_u16().to_string())
        }
    }
}

/// The signing seed in `file` (hex), made (owner-only) if missing.
fn discord_key(file: &std::path::Path) -> anyhow::Result<SigningKey> {
    let seed = crate::secrets::load_or_create_key(file, 32)?;
    let seed: [u8; 32] = seed
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{} must hold a 32-byte seed", file.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}
