//! Weight files: found in the diffusers layout, memory-mapped, and checked tensor by tensor.
//!
//! A network asks its `VarBuilder` for every tensor, with the shape its configuration
//! implies, while it is built. The backend here answers from the safetensors header first:
//! a tensor that is missing or has another shape is recorded and stops the build before
//! its data is read, so the error names the first bad tensor and its file instead of
//! failing later inside a matrix product.

use crate::EngineError;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// Tensors a file may hold that are buffers, not weights (older CLIP checkpoints keep their
/// position ids), so no network asks for them.
const BUFFERS: [&str; 1] = ["position_ids"];

/// File names a part's weights may have, in order of preference.
const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];

/// The safetensors file of one part (`unet`, `vae`, `text_encoder`).
pub fn weight_file(part_dir: &Path) -> Result<PathBuf, EngineError> {
    WEIGHT_FILES
        .iter()
        .map(|name| part_dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            EngineError::invalid_model(
                part_dir,
                format!("no weight file (looked for {})", WEIGHT_FILES.join(", ")),
            )
        })
}

/// What was wrong with a tensor that failed its check.
#[derive(Debug, Clone, PartialEq)]
enum Problem {
    Missing(String),
    Shape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

type ProblemSlot = Arc<Mutex<Option<Problem>>>;
type Requested = Arc<Mutex<HashSet<String>>>;

/// A memory-mapped safetensors file that checks each tensor against the requested shape
/// and remembers what was asked for.
struct CheckedTensors {
    tensors: MmapedSafetensors,
    problem: ProblemSlot,
    requested: Requested,
}

impl CheckedTensors {
    /// Records the problem and turns it into candle's error type, which is all a backend may
    /// return. The latest problem is the one that stopped the build: some networks probe a
    /// tensor under one shape and fall back to another, and a failed probe must not mask
    /// the failure that follows.
    fn fail(&self, problem: Problem) -> candle_core::Error {
        let message = match &problem {
            Problem::Missing(name) => format!("tensor {name} is missing"),
            Problem::Shape { tensor, .. } => format!("tensor {tensor} has the wrong shape"),
        };
        *self.problem.lock().unwrap_or_else(PoisonError::into_inner) = Some(problem);
        candle_core::Error::Msg(message)
    }

    fn stored_shape(&self, name: &str) -> candle_core::Result<Vec<usize>> {
        self.requested
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        match self.tensors.get(name) {
            Ok(view) => Ok(view.shape().to_vec()),
            Err(_) => Err(self.fail(Problem::Missing(name.to_string()))),
        }
    }
}

impl SimpleBackend for CheckedTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let found = self.stored_shape(name)?;
        if found != shape.dims() {
            return Err(self.fail(Problem::Shape {
                tensor: name.to_string(),
                expected: shape.dims().to_vec(),
                found,
            }));
        }
        self.tensors.load(name, device)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.stored_shape(name)?;
        self.tensors.load(name, device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }
}

/// One part's weights, ready to build a network from.
pub struct Weights {
    file: PathBuf,
    problem: ProblemSlot,
    requested: Requested,
    /// Every tensor name in the file.
    names: Vec<String>,
    vb: VarBuilder<'static>,
}

impl Weights {
    /// Memory-maps `file`; tensors are converted to `dtype` on `device` as they are read.
    #[allow(unsafe_code)]
    pub fn open(file: &Path, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        // SAFETY: the mapping is sound only while the file is not modified or truncated.
        // A model directory is written once and then only read: models are replaced by
        // writing a new directory, never by rewriting weight files in place, and nothing in
        // this process writes to a file it has mapped.
        let tensors = unsafe { MmapedSafetensors::new(file) }
            .map_err(|e| EngineError::invalid_model(file, first_line(&e)))?;
        let problem = ProblemSlot::default();
        let requested = Requested::default();
        let names = tensors
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let backend = CheckedTensors {
            tensors,
            problem: Arc::clone(&problem),
            requested: Arc::clone(&requested),
        };
        Ok(Weights {
            file: file.to_path_buf(),
            problem,
            requested,
            names,
            vb: VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        })
    }

    /// Builds a network, reporting the first missing or mis-shaped tensor by name and file,
    /// then any tensor of the file the network did not use.
    pub fn build<T>(
        self,
        make: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T, EngineError> {
        let built = make(self.vb).map_err(|e| {
            let problem = self
                .problem
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            match problem {
                Some(Problem::Missing(tensor)) => EngineError::MissingTensor {
                    file: self.file.clone(),
                    tensor,
                },
                Some(Problem::Shape {
                    tensor,
                    expected,
                    found,
                }) => EngineError::TensorShape {
                    file: self.file.clone(),
                    tensor,
                    expected,
                    found,
                },
                None => EngineError::invalid_model(&self.file, first_line(&e)),
            }
        })?;
        let requested = self
            .requested
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut unused: Vec<&String> = self
            .names
            .iter()
            .filter(|name| !requested.contains(*name))
            .filter(|name| !BUFFERS.iter().any(|b| name.ends_with(b)))
            .collect();
        unused.sort();
        match unused.first() {
            None => Ok(built),
            Some(tensor) => Err(EngineError::UnexpectedTensor {
                file: self.file.clone(),
                tensor: tensor.to_string(),
                count: unused.len(),
            }),
        }
    }
}

/// candle decorates errors with backtraces and context; the first line is the message.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
