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
        /// Directory to create.
        dir: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Architecture: sd1.5, or sd2.1 (v-prediction, GELU text encoder).
        #[arg(long, default_value = "sd1.5", value_parser = ["sd1.5", "sd2.1"])]
        arch: String,
        /// The real checkpoint's shapes instead (about 4 GB, random weights): for benchmarks
        /// of the real arithmetic where no weights can be downloaded.
        #[arg(long)]
        full_size: bool,
    },
    /// List the models in a directory of models (one model per subdirectory).
    List {
        /// Directory holding model directories.
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
        } => {
            let arch = if arch == "sd2.1" {
                sparkle_engine::Architecture::Sd21
            } else {
                sparkle_engine::Architecture::Sd15
            };
            let scale = if full_size {
                sparkle_engine::ModelScale::Full
            } else {
                sparkle_engine::ModelScale::Tiny
            };
            sparkle_engine::write_random_model(&dir, seed, arch, scale)
                .with_context(|| format!("cannot write the tiny model to {}", dir.display()))?;
            eprintln!("wrote a tiny model to {}", dir.display());
        }
        ModelCommand::List { dir } => {
            let entries = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?;
            let mut rows = Vec::new();
            for entry in entries.flatten() {
                let path = entry.path();
                if let Ok(d) = sparkle_engine::describe(&path) {
                    rows.push(format!(
                        "{}\t{}\t{}px\t{:.1} MB",
                        d.name,
                        d.architecture,
                        d.native_size,
                        d.bytes as f64 / 1e6
                    ));
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
