//! Where a model comes from: a directory in the diffusers layout, or one single-file
//! checkpoint. Either way the rest of the engine gets the same configurations, tokenizers and
//! checked weights; only where they are read from differs.

use crate::config::{self, ClipConfig, ModelIndex, ScheduleConfig, UNetConfig, VaeConfig};
use crate::model::Architecture;
use crate::single_file::Checkpoint;
use crate::tokenizer::Tokenizer;
use crate::weights::{weight_file, MappedFile, Weights};
use crate::EngineError;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// One network of a model, as the diffusers layout names its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
    Unet,
    Vae,
}

impl Part {
    pub fn dir(self) -> &'static str {
        match self {
            Part::TextEncoder => "text_encoder",
            Part::TextEncoder2 => "text_encoder_2",
            Part::Unet => "unet",
            Part::Vae => "vae",
        }
    }
}

/// Every part's configuration: what the networks are built from.
#[derive(Debug, Clone)]
pub(crate) struct Configs {
    pub index: ModelIndex,
    pub text_encoder: ClipConfig,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<ClipConfig>,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub schedule: ScheduleConfig,
}

/// A model on disk.
pub(crate) enum Layout {
    /// A directory with `model_index.json` and one directory per part.
    Diffusers(PathBuf),
    /// One `.safetensors` file with every network, in the original code's names.
    SingleFile(Box<Checkpoint>),
}

impl Layout {
    /// A directory is read as the diffusers layout, a file as a single-file checkpoint.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let metadata = std::fs::metadata(path).map_err(|e| EngineError::io(path, e))?;
        if metadata.is_dir() {
            Ok(Layout::Diffusers(path.to_path_buf()))
        } else {
            Ok(Layout::SingleFile(Box::new(Checkpoint::read(path)?)))
        }
    }

    /// What the service calls the model: the directory's name, or the file's without its
    /// extension.
    pub fn name(&self) -> String {
        let name = match self {
            Layout::Diffusers(dir) => dir.file_name(),
            Layout::SingleFile(checkpoint) => checkpoint.file().file_stem(),
        };
        name.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    pub fn configs(&self) -> Result<Configs, EngineError> {
        let dir = match self {
            Layout::SingleFile(checkpoint) => return Ok(checkpoint.configs().clone()),
            Layout::Diffusers(dir) => dir,
        };
        let index = config::check_model_index(dir)?;
        let second = dir.join(Part::TextEncoder2.dir());
        Ok(Configs {
            index,
            text_encoder: ClipConfig::read(&dir.join(Part::TextEncoder.dir()))?,
            text_encoder_2: match second.is_dir() {
                true => Some(ClipConfig::read(&second)?),
                false => None,
            },
            unet: UNetConfig::read(&dir.join(Part::Unet.dir()))?,
            vae: VaeConfig::read(&dir.join(Part::Vae.dir()))?,
            schedule: ScheduleConfig::read(&dir.join("scheduler"))?,
        })
    }

    /// The first text encoder's tokenizer, and the second's where there is one.
    pub fn tokenizers(&self) -> Result<(Tokenizer, Option<Tokenizer>), EngineError> {
        match self {
            Layout::SingleFile(checkpoint) => checkpoint.tokenizers(),
            Layout::Diffusers(dir) => {
                let first = Tokenizer::load(&dir.join("tokenizer"))?;
                let second = match dir.join(Part::TextEncoder2.dir()).is_dir() {
                    true => Some(Tokenizer::load(&dir.join("tokenizer_2"))?),
                    false => None,
                };
                Ok((first, second))
            }
        }
    }

    /// The file errors about a part's configuration name: its `config.json`, or the single
    /// file its configuration was read from.
    pub fn config_file(&self, part: Part) -> PathBuf {
        match self {
            Layout::Diffusers(dir) => dir.join(part.dir()).join("config.json"),
            Layout::SingleFile(checkpoint) => checkpoint.file().to_path_buf(),
        }
    }

    /// The file errors about a tokenizer name (`second`: SDXL's second).
    pub fn vocab_file(&self, second: bool) -> PathBuf {
        match self {
            Layout::Diffusers(dir) => {
                let name = if second { "tokenizer_2" } else { "tokenizer" };
                dir.join(name).join("vocab.json")
            }
            Layout::SingleFile(checkpoint) => checkpoint.file().to_path_buf(),
        }
    }

    /// The family: a single file's by its text encoders, a directory's by its configuration.
    pub fn architecture(&self, configs: &Configs) -> Architecture {
        match self {
            Layout::Diffusers(_) => Architecture::detect(&configs.unet, &configs.schedule),
            Layout::SingleFile(checkpoint) => checkpoint.architecture(),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Layout::Diffusers(dir) => dir,
            Layout::SingleFile(checkpoint) => checkpoint.file(),
        }
    }

    /// Total size of the weight files, in bytes.
    pub fn weight_bytes(&self, configs: &Configs) -> Result<u64, EngineError> {
        let files = match self {
            Layout::SingleFile(checkpoint) => vec![checkpoint.file().to_path_buf()],
            Layout::Diffusers(dir) => {
                let mut parts = vec![Part::TextEncoder, Part::Unet, Part::Vae];
                if configs.text_encoder_2.is_some() {
                    parts.push(Part::TextEncoder2);
                }
                parts
                    .into_iter()
                    .map(|part| weight_file(&dir.join(part.dir())))
                    .collect::<Result<_, _>>()?
            }
        };
        files.iter().try_fold(0, |total, file| {
            let metadata = std::fs::metadata(file).map_err(|e| EngineError::io(file, e))?;
            Ok(total + metadata.len())
        })
    }

    /// Opens the weights for reading: a single file is memory-mapped once for all networks.
    pub fn weights(&self) -> Result<WeightFiles<'_>, EngineError> {
        Ok(match self {
            Layout::Diffusers(dir) => WeightFiles::Diffusers(dir),
            Layout::SingleFile(checkpoint) => {
                WeightFiles::SingleFile(checkpoint, MappedFile::open(checkpoint.file())?)
            }
        })
    }
}

/// A model's weights, open for building its networks.
pub(crate) enum WeightFiles<'a> {
    Diffusers(&'a Path),
    SingleFile(&'a Checkpoint, MappedFile),
}

impl WeightFiles<'_> {
    /// One part's weights, converted to `dtype` on `device` as they are read.
    pub fn part(&self, part: Part, dtype: DType, device: &Device) -> Result<Weights, EngineError> {
        match self {
            WeightFiles::Diffusers(dir) => {
                Weights::open(&weight_file(&dir.join(part.dir()))?, dtype, device)
            }
            WeightFiles::SingleFile(checkpoint, mapped) => Ok(Weights::named(
                mapped,
                checkpoint.naming(part),
                dtype,
                device,
            )),
        }
    }
}
