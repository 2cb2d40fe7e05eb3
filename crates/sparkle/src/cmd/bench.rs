//! `sparkle bench …`: measurements to report, not tests.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use sparkle_core::Scheduler;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod ingress;
mod queue;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The engine alone: images per second, time per UNet step, achieved TFLOP/s and device
    /// memory, for each batch size, after one warm-up batch per size.
    Engine(EngineBench),
    /// The attention kernels alone (CUDA build): each kernel the GPU has, on the shapes a
    /// model's attention layers run at a batch size, in milliseconds per call and TFLOP/s.
    Attention(AttentionBench),
    /// Event streams: opens N `GET /v1/jobs/{id}/events` streams on a running gateway and
    /// holds them for a while, counting events; measure the gateway (CPU, queries) meanwhile.
    /// `bench/event-streams.sh` runs it against a fresh `sparkle up`.
    Streams(StreamsBench),
    /// Ingress: REST submits, signed Discord commands or readiness probes acknowledged per
    /// second by a running gateway, through its real listener, with latency percentiles;
    /// `--preload` queues jobs first to measure at a depth. `bench/ingress.sh` runs it
    /// against a fresh `sparkle up`.
    Ingress(ingress::IngressBench),
    /// The queue alone: jobs enqueued, then leased and completed, then both at once, per
    /// second through the configured database (SQLite in the data directory, or the
    /// PostgreSQL of `database.url`) with durable commits. Adds the jobs it measures with:
    /// point it at a scratch data directory or schema.
    Queue(queue::QueueBench),
}

/// Where a running gateway is and how to reach it.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The gateway, e.g. https://127.0.0.1:8443.
    #[arg(long)]
    url: String,
    /// File holding the API key to call it with.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// The CA (or self-signed certificate) to trust for the gateway.
    #[arg(long, value_name = "FILE")]
    ca_file: PathBuf,
}

impl GatewayArgs {
    /// The gateway's base URL, without a trailing slash.
    fn base(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// The API key, and an HTTPS client that trusts only `--ca-file`, keeping up to `idle`
    /// connections open between requests, each request given `timeout` if any.
    fn client(
        &self,
        idle: usize,
        timeout: Option<Duration>,
    ) -> anyhow::Result<(zeroize::Zeroizing<String>, reqwest::Client)> {
        let key = crate::secrets::read_secret_file(&self.key_file)?;
        let pem = std::fs::read(&self.ca_file)
            .with_context(|| format!("cannot read {}", self.ca_file.display()))?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).context("--ca-file")?)
            .pool_max_idle_per_host(idle);
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        let client = builder.build().context("cannot build the HTTPS client")?;
        Ok((key, client))
    }
}

#[derive(Debug, Args)]
pub struct StreamsBench {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// The job to follow.
    #[arg(long)]
    job: String,
    /// Streams to open.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Seconds to hold them open once all are open.
    #[arg(long, default_value_t = 30)]
    secs: u64,
}

#[derive(Debug, Args)]
pub struct EngineBench {
    /// Model directory in the diffusers layout (random full-size weights measure the same
    /// arithmetic as the real model: `sparkle model tiny DIR --full-size`).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 25)]
    steps: u32,
    /// WIDTHxHEIGHT (default: the model's native size).
    #[arg(long)]
    size: Option<String>,
    /// Guidance scale; above 1 every step runs the UNet on twice the batch.
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    #[arg(long, default_value = "ddim")]
    scheduler: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (f32 on CPU, f16 on CUDA), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Timed batches per size (after the warm-up); the best is reported.
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// What each image starts from: `text`, `img2img` (a generated source image at
    /// --strength), `inpaint` (the same with its left half masked) or `hires` (text, then a
    /// second pass at --hires-scale times the size, at --strength).
    #[arg(long, default_value = "text", value_parser = ["text", "img2img", "inpaint", "hires"])]
    mode: String,
    /// The share of the schedule that runs from a source image or in the second pass.
    #[arg(long, default_value_t = 0.5)]
    strength: f32,
    /// The second pass's size over the first (--mode hires).
    #[arg(long, default_value_t = 2.0)]
    hires_scale: f32,
    /// First check the device against the CPU in f32 on the same weights: the relative
    /// error of the latents after one step and of the decoded image (1 image, 2 steps).
    #[arg(long)]
    check: bool,
    /// With --check, fail when either relative error exceeds this.
    #[arg(long, default_value_t = 1e-2, value_name = "ERROR")]
    check_max: f64,
    /// Apply a random LoRA of this rank on every linear layer of the UNet's transformers
    /// (as most LoRAs are trained; written to a scratch directory): the time to merge it,
    /// the steps with it merged, and what it would add to each UNet call as low-rank side
    /// paths instead.
    #[arg(long, value_name = "RANK")]
    lora_rank: Option<usize>,
}

/// Arguments of `sparkle bench attention`.
#[derive(Debug, Args)]
pub struct AttentionBench {
    /// Whose attention layers: sd1.5 (512², heads 40, 80 and 160 wide, text of 77 tokens)
    /// or sdxl (1024², heads 64 wide), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "sd1.5,sdxl",
          value_parser = ["sd1.5", "sdxl"])]
    arch: Vec<String>,
    /// Images per batch; with guidance each layer runs on twice as many rows.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// f16 or bf16.
    #[arg(long, default_value = "f16")]
    precision: String,
    /// Timed calls per kernel and shape (after an untimed one).
    #[arg(long, default_value_t = 20)]
    repeat: usize,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Engine(args) => engine(args),
        BenchCommand::Attention(args) => attention(args),
        BenchCommand::Streams(args) => tokio::runtime::Runtime::new()
            .context("cannot start the runtime")?
            .block_on(streams(args)),
        BenchCommand::Ingress(args) => tokio::runtime::Runtime::new()
            .context("cannot start the runtime")?
            .block_on(ingress::run(args)),
        BenchCommand::Queue(args) => tokio::runtime::Runtime::new()
            .context("cannot start the runtime")?
            .block_on(queue::run(args)),
    }
}

fn attention(args: AttentionBench) -> anyhow::Result<()> {
    use sparkle_engine::AttentionShape;
    if args.batch == 0 || args.repeat == 0 {
        bail!("--batch and --repeat must be at least 1");
    }
    let rows = 2 * args.batch;
    let shape = |queries, keys, heads, head_dim| AttentionShape {
        batch: rows,
        queries,
        keys,
        heads,
        head_dim,
    };
    let mut shapes = Vec::new();
    for arch in &args.arch {
        shapes.extend(match arch.as_str() {
            // Self-attention at 64², 32² and 16² latent pixels, cross-attention at 64².
            "sd1.5" => vec![
                shape(4096, 4096, 8, 40),
                shape(1024, 1024, 8, 80),
                shape(256, 256, 8, 160),
                shape(4096, 77, 8, 40),
            ],
            // Self-attention at 64² and 32², cross-attention at 64².
            _ => vec![
                shape(4096, 4096, 10, 64),
                shape(1024, 1024, 20, 64),
                shape(4096, 77, 10, 64),
            ],
        });
    }
    let timings = sparkle_engine::time_attention(
        super::serve::parse_device(&args.device)?,
        args.precision
            .parse()
            .map_err(|e| anyhow::anyhow!("--precision: {e}"))?,
        &shapes,
        args.repeat,
    )?;
    println!("| rows × queries × keys, heads × width | kernel | ms per call | TFLOP/s |");
    println!("|---|---|---:|---:|");
    for t in timings {
        let s = t.shape;
        println!(
            "| {} × {} × {}, {} × {} | {} | {:.3} | {:.0} |",
            s.batch,
            s.queries,
            s.keys,
            s.heads,
            s.head_dim,
            t.kernel,
            t.seconds * 1e3,
            s.flops() / t.seconds / 1e12
        );
    }
    Ok(())
}

/// One timed batch.
struct Sample {
    total: Duration,
    /// Median interval between step reports: one UNet call and one sampler step.
    step: Duration,
    memory: Option<u64>,
}

fn engine(args: EngineBench) -> anyhow::Result<()> {
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch needs sizes of at least 1");
    }
    if args.steps == 0 || args.repeat == 0 {
        bail!("--steps and --repeat must be at least 1");
    }
    let scheduler: Scheduler = args
        .scheduler
        .parse()
        .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?;
    let description = sparkle_engine::describe(&args.model)
        .with_context(|| format!("cannot read the model at {}", args.model.display()))?;
    let (width, height) = match &args.size {
        None => (description.native_size, description.native_size),
        Some(size) => parse_size(size)?,
    };
    let options = sparkle_engine::EngineOptions {
        device: super::serve::parse_device(&args.device)?,
        precision: args
            .precision
            .parse()
            .map_err(|e| anyhow::anyhow!("--precision: {e}"))?,
    };
    let started = Instant::now();
    let mut engine = sparkle_engine::Engine::load(&args.model, &options)
        .with_context(|| format!("cannot load the model at {}", args.model.display()))?;
    let load = started.elapsed();
    let scratch = tempfile::tempdir().context("cannot make a scratch directory")?;
    let mut lora_line = String::new();
    let loras = match args.lora_rank {
        None => Vec::new(),
        Some(rank) => {
            let dir = scratch.path().join("loras");
            let layers = sparkle_engine::lora::write_random(
                &args.model,
                &dir.join("random.safetensors"),
                rank,
            )?;
            engine.load_loras(&dir)?;
            let set = vec![sparkle_core::LoraWeight {
                name: "random".into(),
                weight: 1.0,
            }];
            let merged = engine.prepare_loras(&set)?;
            lora_line =
                format!("a random LoRA of rank {rank} on {layers} layers, merged in {merged:.2?}");
            set
        }
    };
    let info = engine.info().clone();
    println!(
        "model {} ({}), {}, {}, {width}x{height}, {} {} steps, guidance {}, {}; loaded in {load:.2?}",
        info.name, info.architecture, info.device, info.dtype, args.steps, scheduler, args.guidance,
        match args.mode.as_str() {
            "text" => "from text".to_string(),
            "hires" => format!("a second pass at {}x, strength {}", args.hires_scale, args.strength),
            mode => format!("{mode} at strength {}", args.strength),
        }
    );
    if !lora_line.is_empty() {
        println!("{lora_line}");
    }
    let source = bench_source(&args.mode, width, height);
    let hires = (args.mode == "hires").then(|| {
        let side = |s: u32| ((s as f32 * args.hires_scale / 8.0).round() as u32) * 8;
        sparkle_engine::Hires {
            width: side(width),
            height: side(height),
            steps: args.steps,
            strength: args.strength,
        }
    });
    if loras.is_empty() {
        println!("| batch | images/s | s/batch | ms/UNet step | TFLOP/s | device memory |");
        println!("|---:|---:|---:|---:|---:|---:|");
    } else {
        println!("| batch | images/s | s/batch | ms/UNet step | TFLOP/s | device memory | as side paths: + ms/UNet step |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
    }
    let limit = engine.batch_limit(width, height, args.guidance > 1.0);
    if limit != usize::MAX {
        println!("at most {limit} images per pass at this size, from the device memory free now");
    }
    // The check's CPU run is not part of a cold start.
    let mut checking = std::time::Duration::ZERO;
    if args.check {
        let began = std::time::Instant::now();
        check_against_cpu(&engine, &args, scheduler, width, height)?;
        checking = began.elapsed();
    }
    let cfg_rows = if args.guidance > 1.0 { 2 } else { 1 };
    let mut first_image = None;
    for &size in &args.batch {
        let batch = sparkle_engine::Batch {
            width,
            height,
            steps: args.steps,
            guidance_scale: args.guidance,
            scheduler,
            strength: if source.is_some() || hires.is_some() {
                args.strength
            } else {
                1.0
            },
            hires,
            loras: loras.clone(),
            items: (0..size)
                .map(|i| sparkle_engine::BatchItem {
                    prompt: format!("a corgi, style of monet, number {i}"),
                    negative_prompt: "blurry".into(),
                    seed: i as u64,
                    source: source.clone(),
                })
                .collect(),
        };
        let mut best: Option<Sample> = None;
        for round in 0..=args.repeat {
            let sample = time_batch(&engine, &batch)?;
            if first_image.is_none() {
                first_image = Some(started.elapsed().saturating_sub(checking));
            }
            if round == 0 {
                continue; // warm-up: kernels load, memory is allocated
            }
            if best.as_ref().is_none_or(|b| sample.total < b.total) {
                best = Some(sample);
            }
        }
        let best = best.context("no timed round")?;
        let flops = engine.unet_flops(size * cfg_rows, width, height);
        let step_s = best.step.as_secs_f64();
        let side = if loras.is_empty() {
            String::new()
        } else {
            let (side, _) = engine.time_lora_side_paths(
                &loras,
                size * cfg_rows,
                width,
                height,
                args.repeat.max(3),
            )?;
            format!(" {:.2} |", side.as_secs_f64() * 1e3)
        };
        println!(
            "| {size} | {:.2} | {:.3} | {:.1} | {:.2} | {} |{side}",
            size as f64 / best.total.as_secs_f64(),
            best.total.as_secs_f64(),
            step_s * 1e3,
            if step_s > 0.0 {
                flops / step_s / 1e12
            } else {
                0.0
            },
            best.memory
                .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or_else(|| "n/a".into()),
        );
    }
    if let Some(first) = first_image {
        println!(
            "cold start (load to the first finished batch of {}): {first:.2?}",
            args.batch[0]
        );
    }
    println!(
        "UNet cost: {:.3} TFLOP per image per step{}",
        engine.unet_flops(cfg_rows, width, height) / 1e12,
        if cfg_rows == 2 { " (with CFG)" } else { "" }
    );
    Ok(())
}

/// The source image of `--mode img2img` and `inpaint`: a gradient, its left half masked
/// for inpainting.
fn bench_source(mode: &str, width: u32, height: u32) -> Option<sparkle_engine::SourceImage> {
    let (w, h) = (width as usize, height as usize);
    let rgb = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [(x % 256) as u8, (y % 256) as u8, 128]))
        .collect();
    let mask = (0..h)
        .flat_map(|_| (0..w).map(move |x| if x < w / 2 { 255 } else { 0 }))
        .collect();
    match mode {
        "img2img" => Some(sparkle_engine::SourceImage { rgb, mask: None }),
        "inpaint" => Some(sparkle_engine::SourceImage {
            rgb,
            mask: Some(mask),
        }),
        _ => None,
    }
}

/// The relative error of this engine against the CPU in f32 on the same model and noise.
fn check_against_cpu(
    engine: &sparkle_engine::Engine,
    args: &EngineBench,
    scheduler: Scheduler,
    width: u32,
    height: u32,
) -> anyhow::Result<()> {
    let batch = sparkle_engine::Batch {
        width,
        height,
        steps: 2,
        guidance_scale: args.guidance,
        scheduler,
        strength: 1.0,
        hires: None,
        loras: Vec::new(),
        items: vec![sparkle_engine::BatchItem {
            prompt: "a corgi, style of monet".into(),
            negative_prompt: "blurry".into(),
            seed: 7,
            source: None,
        }],
    };
    let started = Instant::now();
    let cpu = sparkle_engine::Engine::load(
        &args.model,
        &sparkle_engine::EngineOptions {
            device: sparkle_engine::DeviceChoice::Cpu,
            precision: sparkle_engine::Precision::F32,
        },
    )
    .context("cannot load the model on the CPU")?;
    let reference = cpu.probe(&batch)?;
    let cpu_time = started.elapsed();
    let (first, image) = engine.probe(&batch)?.relative_error(&reference);
    println!(
        "check against the CPU in f32 (1 image, 2 steps; CPU took {cpu_time:.1?}): relative error after the first step {first:.2e}, image {image:.2e}"
    );
    if !(first <= args.check_max && image <= args.check_max) {
        anyhow::bail!(
            "the device is further from the CPU than --check-max {:.0e}: {first:.2e} after the first step, {image:.2e} on the image",
            args.check_max
        );
    }
    Ok(())
}

fn time_batch(
    engine: &sparkle_engine::Engine,
    batch: &sparkle_engine::Batch,
) -> anyhow::Result<Sample> {
    let mut marks = Vec::with_capacity(batch.steps as usize);
    let mut memory = engine.device_memory_in_use();
    let started = Instant::now();
    let mut on_step = |_| {
        marks.push(Instant::now());
        memory = memory.max(engine.device_memory_in_use());
        ControlFlow::Continue(())
    };
    engine.generate(batch, &mut on_step)?;
    let total = started.elapsed();
    let mut intervals: Vec<Duration> = marks.windows(2).map(|w| w[1] - w[0]).collect();
    intervals.sort();
    let step = intervals
        .get(intervals.len() / 2)
        .copied()
        .unwrap_or(total / batch.steps.max(1));
    Ok(Sample {
        total,
        step,
        memory: memory.max(engine.device_memory_in_use()),
    })
}

fn parse_size(text: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .context("--size must be WIDTHxHEIGHT")?;
    Ok((
        w.trim().parse().context("--size width")?,
        h.trim().parse().context("--size height")?,
    ))
}

/// Opens the streams, holds them, and says how many opened, how many were refused and how
/// many events arrived while they were held.
async fn streams(args: StreamsBench) -> anyhow::Result<()> {
    // Streams are held open as long as asked: no timeout.
    let (key, client) = args.gateway.client(0, None)?;
    let url = format!("{}/v1/jobs/{}/events", args.gateway.base(), args.job);
    let events = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hold = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let mut opened = 0usize;
    let mut refused = std::collections::BTreeMap::<u16, usize>::new();
    let mut tasks = Vec::new();
    for _ in 0..args.streams {
        let response = client.get(&url).bearer_auth(key.as_str()).send().await;
        let mut response = match response {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                *refused.entry(r.status().as_u16()).or_default() += 1;
                continue;
            }
            Err(e) => bail!("cannot open stream {}: {e}", opened + 1),
        };
        opened += 1;
        let (events, hold) = (events.clone(), hold.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hold.cancelled() => break,
                    chunk = response.chunk() => match chunk {
                        Ok(Some(bytes)) => {
                            let n = bytes.windows(6).filter(|w| w == b"event:").count();
                            events.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => break,
                    },
                }
            }
        }));
    }
    println!(
        "opened {opened} streams in {:.1} s; refused: {refused:?}",
        started.elapsed().as_secs_f64()
    );
    let before = events.load(std::sync::atomic::Ordering::Relaxed);
    println!("holding them for {} s", args.secs);
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let during = events.load(std::sync::atomic::Ordering::Relaxed) - before;
    hold.cancel();
    for task in tasks {
        let _ = task.await;
    }
    println!("events while held: {during}");
    Ok(())
}
