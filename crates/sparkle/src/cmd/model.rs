//! `sparkle model …`: models on local disk.

use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a tiny model with the real Stable Diffusion architecture (CLIP text encoder,
    /// UNet, VAE, CLIP's tokenizer) and deterministic random weights, in the diffusers
    /// layout. It makes noise-like images fast on a CPU: for tests and offline demos.
    Tiny {
        /// Directory to create (with --single-file: the .safetensors file to write).
        dir: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Architecture: sd1.5; sd2.1 (v-prediction, GELU text encoder); sd-turbo (SD 2.1's
        /// networks, a few-step schedule: 1 step, no guidance by default); sdxl (two text
        /// encoders, pooled text and size conditioning); sdxl-turbo (SDXL's networks at 512,
        /// few steps); sd1.5-inpainting and sdxl-inpainting (UNets of 9 input channels: the
        /// latents, the mask and the masked image's latents).
        #[arg(long, default_value = "sd1.5",
              value_parser = ["sd1.5", "sd2.1", "sd-turbo", "sdxl", "sdxl-turbo", "sd1.5-inpainting", "sdxl-inpainting"])]
        arch: String,
        /// The real checkpoint's shapes instead (about 4 GB, random weights): for benchmarks
        /// of the real arithmetic where no weights can be downloaded.
        #[arg(long)]
        full_size: bool,
        /// Write one single-file checkpoint in the original Stable Diffusion layout instead,
        /// with ModelSpec metadata (and, for a few-step model, NAME.sparkle.json beside it).
        #[arg(long)]
        single_file: bool,
    },
    /// Download a diffusers-layout model from the Hugging Face hub (or HF_ENDPOINT), with
    /// resume and checksum verification. Only safetensors weights are fetched, never pickles.
    /// Set HF_TOKEN for gated or private repositories.
    Pull {
        /// Repository, e.g. stabilityai/sd-turbo.
        name: String,
        /// Directory holding model directories; the model lands in DIR/<repository name>.
        #[arg(long, value_name = "DIR", default_value = "models")]
        dir: PathBuf,
        /// Branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
        /// Prefer the fp16 weight files where the repository has them (half the download).
        #[arg(long)]
        fp16: bool,
        /// The hub's address (default: HF_ENDPOINT or https://huggingface.co).
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
    },
    /// List the models in a directory of models: diffusers-layout subdirectories and
    /// single-file .safetensors checkpoints.
    List {
        /// Directory holding models.
        #[arg(long, value_name = "DIR", default_value = "models")]
        dir: PathBuf,
    },
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Tiny {
            dir,
            seed,
            arch,
            full_size,
            single_file,
        } => {
            let kind = sparkle_engine::RandomModel::from_name(&arch)
                .with_context(|| format!("unknown architecture {arch}"))?;
            let scale = if full_size {
                sparkle_engine::ModelScale::Full
            } else {
                sparkle_engine::ModelScale::Tiny
            };
            if single_file && dir.extension().is_none_or(|e| e != "safetensors") {
                anyhow::bail!(
                    "{}: a single-file checkpoint's name ends in .safetensors",
                    dir.display()
                );
            }
            let written = if single_file {
                sparkle_engine::write_random_single_file(&dir, seed, kind, scale)
            } else {
                sparkle_engine::write_random(&dir, seed, kind, scale)
            };
            written.with_context(|| format!("cannot write the tiny model to {}", dir.display()))?;
            eprintln!("wrote a tiny model to {}", dir.display());
        }
        ModelCommand::Pull {
            name,
            dir,
            revision,
            fp16,
            endpoint,
        } => {
            let target = dir.join(name.rsplit('/').next().unwrap_or(&name));
            let mut options = sparkle_hub::PullOptions {
                revision,
                fp16,
                ..Default::default()
            };
            if let Some(endpoint) = endpoint {
                options.endpoint = endpoint;
            }
            let mut bar = Bars(None);
            let pulled = crate::runtime::block_on(async {
                Ok(sparkle_hub::pull(&name, &target, &options, &mut bar).await?)
            })?;
            eprintln!(
                "pulled {name} at {} into {} ({} files, {:.1} MB downloaded)",
                pulled.revision,
                pulled.dir.display(),
                pulled.files.len(),
                pulled.bytes as f64 / 1e6
            );
        }
        ModelCommand::List { dir } => {
            let entries = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?;
            let mut rows = Vec::new();
            for entry in entries.flatten() {
                let path = entry.path();
                let single_file = path.extension().is_some_and(|e| e == "safetensors");
                if !single_file && !path.is_dir() {
                    continue;
                }
                match sparkle_engine::describe(&path) {
                    Ok(d) => rows.push(format!(
                        "{}\t{}\t{}px\t{:.1} MB\t{}",
                        d.name,
                        d.architecture,
                        d.native_size,
                        d.bytes as f64 / 1e6,
                        d.format
                    )),
                    // A directory may hold anything; a .safetensors file is meant as a model.
                    Err(e) if single_file => eprintln!("skipped: {e}"),
                    Err(_) => {}
                }
            }
            rows.sort();
            if rows.is_empty() {
                eprintln!("no models in {}", dir.display());
            }
            for row in rows {
                println!("{row}");
            }
        }
    }
    Ok(())
}

/// A progress bar per file on standard error.
struct Bars(Option<indicatif::ProgressBar>);

impl sparkle_hub::Progress for Bars {
    fn start_file(&mut self, path: &str, size: u64, already: u64) {
        let bar = indicatif::ProgressBar::new(size);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:40!} {bytes:>10}/{total_bytes:10} {bar:30} {bytes_per_sec:>12} {eta}",
        ) {
            bar.set_style(style);
        }
        bar.set_message(path.to_string());
        bar.set_position(already);
        self.0 = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }

    fn finish_file(&mut self, _path: &str) {
        if let Some(bar) = self.0.take() {
            bar.finish();
        }
    }
}
