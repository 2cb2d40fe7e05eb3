//! Weight files: found in the diffusers layout, memory-mapped, and checked tensor by tensor.
//!
//! A network asks its `VarBuilder` for every tensor, with the shape its configuration
//! implies, while it is built. The backend here answers from the safetensors header first:
//! a tensor that is missing or has another shape is recorded and stops the build before
//! its data is read, so the error names the first bad tensor and its file instead of
//! failing later inside a matrix product.
//!
//! A [`Naming`] says where each tensor the network asks for is stored: under the same name
//! in a diffusers part's own file, or under another name — possibly reshaped, transposed or
//! fused with others — in a single-file checkpoint (`single_file`). Errors name the tensor
//! as the file stores it.

use crate::EngineError;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::{HashMap, HashSet};
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

/// How a tensor the network asks for is stored, relative to the asked-for shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// As asked.
    Same,
    /// A linear weight `[out, in]` stored as a 1×1 convolution kernel `[out, in, 1, 1]`.
    Conv1x1,
    /// A matrix stored transposed.
    Transposed,
    /// Slice `index` of `parts` equal slices along the first dimension of a fused tensor
    /// (OpenCLIP's `in_proj_weight` holds the query, key and value projections).
    Slice { index: usize, parts: usize },
}

impl Form {
    /// The stored shape of a tensor the network wants as `wanted`.
    pub fn stored_shape(self, wanted: &[usize]) -> Vec<usize> {
        match (self, wanted) {
            (Form::Conv1x1, [out, input]) => vec![*out, *input, 1, 1],
            (Form::Transposed, [rows, cols]) => vec![*cols, *rows],
            (Form::Slice { parts, .. }, [first, rest @ ..]) => {
                let mut shape = vec![first * parts];
                shape.extend_from_slice(rest);
                shape
            }
            _ => wanted.to_vec(),
        }
    }

    /// The tensor the network wants, from the stored one.
    pub fn unpack(self, stored: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Form::Same => Ok(stored),
            Form::Conv1x1 => match stored.dims() {
                &[out, input, 1, 1] => stored.reshape((out, input)),
                _ => Ok(stored),
            },
            Form::Transposed => stored.t()?.contiguous(),
            Form::Slice { index, parts } => {
                let size = stored.dim(0)? / parts;
                stored.narrow(0, index * size, size)?.contiguous()
            }
        }
    }
}

/// Where a tensor the network asks for is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub key: String,
    pub form: Form,
}

impl Stored {
    pub fn same(key: impl Into<String>) -> Self {
        Stored {
            key: key.into(),
            form: Form::Same,
        }
    }
}

/// How one network's tensor names map onto a weight file.
pub(crate) trait Naming: Send + Sync {
    /// Where the tensor the network calls `name` is stored.
    fn locate(&self, name: &str) -> Stored;
    /// Whether the file's tensor `key` belongs to this network, which must then use it.
    fn owns(&self, key: &str) -> bool;
}

/// A diffusers part's own file: every tensor under the name the network asks for; every
/// tensor but buffers belongs to the network.
struct SameNames;

impl Naming for SameNames {
    fn locate(&self, name: &str) -> Stored {
        Stored::same(name)
    }

    fn owns(&self, key: &str) -> bool {
        !is_buffer(key)
    }
}

/// A buffer, not a weight: no network asks for it.
pub(crate) fn is_buffer(key: &str) -> bool {
    BUFFERS.iter().any(|b| key.ends_with(b))
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
type Handed = Arc<Mutex<HashMap<String, Tensor>>>;
/// Weights by name and shape.
pub(crate) type Shapes = Vec<(String, Vec<usize>)>;

/// A memory-mapped safetensors file that checks each tensor against the requested shape
/// and remembers what was asked for.
struct CheckedTensors {
    tensors: Arc<MmapedSafetensors>,
    naming: Arc<dyn Naming>,
    problem: ProblemSlot,
    requested: Requested,
    /// Every tensor handed out, by the name the network asked for it.
    handed: Handed,
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

    /// The tensor the network calls `name`, read, converted and in the layout it is held in
    /// (a convolution's kernel already channels-last where it runs so), remembered.
    fn hand_out(
        &self,
        name: &str,
        stored: &Stored,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.tensors.load(&stored.key, device)?;
        let tensor = held_layout(stored.form.unpack(tensor)?.to_dtype(dtype)?)?;
        self.handed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), tensor.clone());
        Ok(tensor)
    }
}

/// A convolution kernel `[k, c, kh, kw]` that runs over channels-last maps is held as KRSC
/// (`[k, kh, kw, c]`, contiguous) and handed to the network as that storage viewed in the
/// asked-for shape, so the layer's own conversion finds it done and copies nothing, and a
/// network built again from the same tensors ([`Kept`]) shares them.
fn held_layout(tensor: Tensor) -> candle_core::Result<Tensor> {
    use crate::layers::Channels;
    if tensor.rank() != 4 {
        return Ok(tensor);
    }
    match Channels::kernel(tensor)? {
        (kernel, Channels::Last) => kernel.permute((0, 3, 1, 2)),
        (kernel, Channels::First) => Ok(kernel),
    }
}

/// Every tensor handed to a network while it was built, by the name the network asked for
/// it: the very tensors the network holds, so keeping them costs no memory. A network built
/// again from them with some replaced ([`Kept::rebuild`]) shares all the others.
#[derive(Clone, Default)]
pub(crate) struct Kept(Arc<HashMap<String, Tensor>>);

impl Kept {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.get(name)
    }

    /// Every tensor's name and shape (as the network asked for it).
    pub fn shapes(&self) -> Shapes {
        let mut shapes: Vec<_> = self
            .0
            .iter()
            .map(|(name, t)| (name.clone(), t.dims().to_vec()))
            .collect();
        shapes.sort();
        shapes
    }

    /// Builds the network again from these tensors, `changed` in place of some: nothing is
    /// read from disk and nothing not changed is copied.
    pub fn rebuild<T>(
        &self,
        changed: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        make: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T, EngineError> {
        let mut held = HashMap::with_capacity(changed.len());
        for (name, tensor) in changed {
            held.insert(name, held_layout(tensor)?);
        }
        let backend = Overlay {
            base: self.clone(),
            changed: held,
        };
        Ok(make(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))?)
    }
}

/// Kept tensors with some replaced.
struct Overlay {
    base: Kept,
    changed: HashMap<String, Tensor>,
}

impl SimpleBackend for Overlay {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.dims() != shape.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor {name} is {:?}, not {:?}",
                tensor.dims(),
                shape.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .changed
            .get(name)
            .or_else(|| self.base.get(name))
            .ok_or_else(|| candle_core::Error::Msg(format!("tensor {name} was never built")))?;
        tensor.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.changed.contains_key(name) || self.base.get(name).is_some()
    }
}

/// Hands a network every tensor it asks for in the shape asked, with no data (one zero,
/// broadcast), and notes the names and shapes: building a network on it lists its weights
/// without reading a file or allocating them.
#[derive(Default)]
struct ShapesOnly {
    asked: Arc<Mutex<Shapes>>,
}

impl SimpleBackend for ShapesOnly {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name.to_string(), shape.dims().to_vec()));
        Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "{name} was asked for without a shape"
        )))
    }

    /// Nothing is stored, so a network probing for an optional tensor (the VAE's attention
    /// layout) takes the layout it falls back to.
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// The names and shapes of the weights a network asks for as `make` builds it, found
/// without any weight file.
pub(crate) fn shapes_of<T>(
    make: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<Shapes, EngineError> {
    let backend = ShapesOnly::default();
    let asked = Arc::clone(&backend.asked);
    make(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))?;
    let mut asked = std::mem::take(&mut *asked.lock().unwrap_or_else(PoisonError::into_inner));
    asked.sort();
    Ok(asked)
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
        let stored = self.naming.locate(name);
        let found = self.stored_shape(&stored.key)?;
        let expected = stored.form.stored_shape(shape.dims());
        // A 1×1 kernel may also be stored flat, as the linear weight it stands for.
        let flat = stored.form == Form::Conv1x1 && found == shape.dims();
        if found != expected && !flat {
            return Err(self.fail(Problem::Shape {
                tensor: stored.key,
                expected,
                found,
            }));
        }
        self.hand_out(name, &stored, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let stored = self.naming.locate(name);
        self.stored_shape(&stored.key)?;
        self.hand_out(name, &stored, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.get(&self.naming.locate(name).key).is_ok()
    }
}

/// A memory-mapped safetensors file, shared by the networks whose weights it holds.
#[derive(Clone)]
pub(crate) struct MappedFile {
    file: PathBuf,
    tensors: Arc<MmapedSafetensors>,
    /// Every tensor name in the file.
    names: Arc<Vec<String>>,
}

impl MappedFile {
    #[allow(unsafe_code)]
    pub fn open(file: &Path) -> Result<Self, EngineError> {
        // SAFETY: the mapping is sound only while the file is not modified or truncated.
        // A model directory, checkpoint or LoRA file is written once and then only read:
        // they are replaced by writing a new one, never by rewriting weight files in place,
        // and nothing in this process writes to a file it has mapped.
        let tensors = unsafe { MmapedSafetensors::new(file) }
            .map_err(|e| EngineError::invalid_model(file, first_line(&e)))?;
        let names = tensors
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        Ok(MappedFile {
            file: file.to_path_buf(),
            tensors: Arc::new(tensors),
            names: Arc::new(names),
        })
    }

    /// Every tensor's name and shape, from the header.
    pub fn shapes(&self) -> Shapes {
        self.tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect()
    }

    /// One tensor, read onto `device`.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        self.tensors.load(name, device)
    }
}

/// One part's weights, ready to build a network from.
pub struct Weights {
    file: PathBuf,
    naming: Arc<dyn Naming>,
    problem: ProblemSlot,
    requested: Requested,
    handed: Handed,
    /// Every tensor name in the file.
    names: Arc<Vec<String>>,
    vb: VarBuilder<'static>,
}

impl Weights {
    /// Memory-maps `file`; tensors are converted to `dtype` on `device` as they are read.
    pub fn open(file: &Path, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        Ok(Self::named(
            &MappedFile::open(file)?,
            Arc::new(SameNames),
            dtype,
            device,
        ))
    }

    /// The tensors of `mapped` that `naming` places, converted to `dtype` on `device` as
    /// they are read.
    pub(crate) fn named(
        mapped: &MappedFile,
        naming: Arc<dyn Naming>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let problem = ProblemSlot::default();
        let requested = Requested::default();
        let handed = Handed::default();
        let backend = CheckedTensors {
            tensors: Arc::clone(&mapped.tensors),
            naming: Arc::clone(&naming),
            problem: Arc::clone(&problem),
            requested: Arc::clone(&requested),
            handed: Arc::clone(&handed),
        };
        Weights {
            file: mapped.file.clone(),
            naming,
            problem,
            requested,
            handed,
            names: Arc::clone(&mapped.names),
            vb: VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        }
    }

    /// Builds a network, reporting the first missing or mis-shaped tensor by name and file,
    /// then any tensor of the file the network did not use.
    pub fn build<T>(
        self,
        make: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T, EngineError> {
        Ok(self.build_kept(make)?.0)
    }

    /// [`Weights::build`], keeping what the network was handed so that it can be built
    /// again with some tensors changed (a LoRA merged in) without reading the file again.
    pub(crate) fn build_kept<T>(
        self,
        make: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<(T, Kept), EngineError> {
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
            .filter(|name| !requested.contains(*name) && self.naming.owns(name))
            .collect();
        unused.sort();
        let handed =
            std::mem::take(&mut *self.handed.lock().unwrap_or_else(PoisonError::into_inner));
        match unused.first() {
            None => Ok((built, Kept(Arc::new(handed)))),
            Some(tensor) => Err(EngineError::UnexpectedTensor {
                file: self.file.clone(),
                tensor: tensor.to_string(),
                count: unused.len(),
            }),
        }
    }
}

/// candle decorates errors with backtraces and context; the first line is the message.
pub(crate) fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
