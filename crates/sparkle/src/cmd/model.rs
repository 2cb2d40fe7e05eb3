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
        ModelCommand::Tiny { dir, seed } => {
            sparkle_engine::write_tiny_model(&dir, seed)
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
