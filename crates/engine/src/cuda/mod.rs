//! The engine's own CUDA path for the operations that dominate a denoising step when left
//! to candle (measured with Nsight Compute on an H100, SD 1.5, batch 8: im2col 42% of GPU
//! time, GroupNorm's dozen f32 kernels about 20%, broadcast bias adds 14%):
//!
//! - convolutions through cuDNN over channels-last maps, with the descriptors, the algorithm
//!   and the workspace chosen once per shape and kept (candle's cuDNN path rebuilds them and
//!   queries the heuristics on every call), and the bias added by one fused kernel;
//! - GroupNorm (+ SiLU), LayerNorm, softmax, GEGLU and flash attention as our own kernels
//!   (`kernels/fused.cu`), shipped as SASS for sm_80–sm_90 so that nothing is compiled by
//!   the driver when a worker starts; linear layers as cuBLASLt products with fused epilogues.
//!
//! One file per kind of operation: `conv`, `norm` (GroupNorm, LayerNorm), `attention`,
//! `linear`, `rows` (softmax, GEGLU) and `copies` (upsampling, concatenation). This one holds
//! what they share: the element types, the kernel module, launch helpers and the `CustomOp`
//! macros.
//!
//! Everything here launches GPU work through raw pointers, hence the `unsafe` blocks; each
//! checks the shapes and contiguity its kernel assumes before launching.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use cudarc::cublaslt as lt;
use cudarc::cudnn::CudnnDataType;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

static FUSED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));
static HOPPER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hopper.fatbin"));

/// The engine's kernel binaries: `kernels/fused.cu` for every GPU, `kernels/hopper.cu` for
/// sm_90 (H100, H200) only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernels {
    Fused,
    Hopper,
}

/// GPU `ordinal` with a stream of its own, on which all of the engine's work is ordered:
/// CUDA graphs are recorded on it (the per-thread default stream would do for launches,
/// not for recording), and with one stream cudarc's per-allocation events, which order work
/// across streams, are only cost (two events made and destroyed per tensor).
pub(crate) fn device(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda_with_stream(ordinal)?;
    if let candle_core::Device::Cuda(cuda) = &device {
        // SAFETY: every tensor of this device is made and used on its one stream, in order.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

/// Whether the environment variable `name` is `value`, read once per process into `cell`:
/// the switches that turn parts of this path on or off for comparison.
fn env_is(cell: &'static std::sync::OnceLock<bool>, name: &str, value: &str) -> bool {
    *cell.get_or_init(|| std::env::var(name).is_ok_and(|v| v == value))
}

/// Whether `xs` takes this path: a CUDA tensor of a floating type the kernels have.
pub(crate) fn accelerated(xs: &Tensor) -> bool {
    xs.device().is_cuda() && matches!(xs.dtype(), DType::F16 | DType::BF16 | DType::F32)
}

fn fail(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA: {what}"))
}

/// A storage type with kernels in `fused.cu` and a cuDNN data type.
trait Element: DeviceRepr + CudnnDataType + Copy + 'static {
    const SUFFIX: &'static str;
    const DTYPE: DType;
    /// The type's name for cuBLASLt.
    const LT_TYPE: lt::sys::cudaDataType_t;
    /// Whether cuDNN's convolutions run on tensor cores in this type itself (16-bit types);
    /// f32 ones may use them through TF32 (10-bit mantissa, f32 range: PyTorch's default for
    /// convolutions too, and what keeps SDXL's f32 VAE decoder fast), which the driver's
    /// `NVIDIA_TF32_OVERRIDE=0` turns off.
    const TENSOR_OPS: bool;
    const ONE: Self;
    const ZERO: Self;
    fn slice(storage: &CudaStorage) -> Result<&CudaSlice<Self>>;
    fn wrap(slice: CudaSlice<Self>) -> CudaStorageSlice;
}

macro_rules! element {
    ($ty:ty, $variant:ident, $suffix:literal, $lt:ident, $tensor_ops:literal, $one:expr, $zero:expr) => {
        impl Element for $ty {
            const SUFFIX: &'static str = $suffix;
            const DTYPE: DType = DType::$variant;
            const LT_TYPE: lt::sys::cudaDataType_t = lt::sys::cudaDataType_t::$lt;
            const TENSOR_OPS: bool = $tensor_ops;
            const ONE: Self = $one;
            const ZERO: Self = $zero;
            fn slice(storage: &CudaStorage) -> Result<&CudaSlice<Self>> {
                match &storage.slice {
                    CudaStorageSlice::$variant(slice) => Ok(slice),
                    _ => Err(fail(format!("expected {} storage", $suffix))),
                }
            }
            fn wrap(slice: CudaSlice<Self>) -> CudaStorageSlice {
                CudaStorageSlice::$variant(slice)
            }
        }
    };
}

element!(f16, F16, "f16", CUDA_R_16F, true, f16::ONE, f16::ZERO);
element!(bf16, BF16, "bf16", CUDA_R_16BF, true, bf16::ONE, bf16::ZERO);
element!(f32, F32, "f32", CUDA_R_32F, false, 1.0, 0.0);

/// Blocks `(x, image)` of 256 threads for the channels-last kernels, which walk `images`
/// images of `size` elements each, `vec` elements per thread and step.
fn image_grid(images: usize, size: usize, vec: usize) -> Result<LaunchConfig> {
    if size > i32::MAX as usize || images > 65_535 {
        return Err(fail(format!("{images} images of {size} elements")));
    }
    Ok(LaunchConfig {
        grid_dim: (
            (size / vec).div_ceil(256 * 4).clamp(1, 4096) as u32,
            images as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// 8 when the channels-last kernels may move 8 elements at a time over these operands
/// (16-bit values, `channels` a multiple of 8, every view starting 16-byte aligned), else 1.
fn vec8<T: Element, const N: usize>(
    stream: &cudarc::driver::CudaStream,
    views: [&CudaView<'_, T>; N],
    channels: usize,
) -> usize {
    use cudarc::driver::DevicePtr;
    // Eight 16-bit values are one 16-byte access; f32 stays one at a time.
    let aligned = views.iter().all(|v| {
        let (ptr, _sync) = v.device_ptr(stream);
        ptr % 16 == 0
    });
    if std::mem::size_of::<T>() == 2 && channels.is_multiple_of(8) && aligned {
        8
    } else {
        1
    }
}

/// The contiguous view of an input, or an error naming it.
fn view<'a, T: Element>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| fail(format!("{what} must be contiguous")))?;
    Ok(T::slice(storage)?.slice(start..end))
}

thread_local! {
    static MODULES: RefCell<HashMap<(DeviceId, Kernels), Arc<CudaModule>>> =
        RefCell::new(HashMap::new());
}

/// What a thread-local cache holds for `key`, made by `make` the first time.
fn cached<K: Eq + std::hash::Hash, V: Clone>(
    cache: &'static std::thread::LocalKey<RefCell<HashMap<K, V>>>,
    key: K,
    make: impl FnOnce() -> Result<V>,
) -> Result<V> {
    if let Some(value) = cache.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(value);
    }
    let value = make()?;
    cache.with(|c| c.borrow_mut().insert(key, value.clone()));
    Ok(value)
}

fn module(dev: &CudaDevice, kernels: Kernels) -> Result<Arc<CudaModule>> {
    cached(&MODULES, (dev.id(), kernels), || {
        graph::refuse_while_recording("the kernel module")?;
        let binary = match kernels {
            Kernels::Fused => FUSED,
            Kernels::Hopper => HOPPER,
        };
        dev.cuda_stream()
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_binary(binary.to_vec()))
            .map_err(|e| fail(format!("loading the {kernels:?} kernels: {e}")))
    })
}

/// Whether `dev` is a Hopper GPU (compute capability 9.0), which `kernels/hopper.cu` is
/// built for.
fn hopper(dev: &CudaDevice) -> bool {
    thread_local! {
        static HOPPER_GPUS: RefCell<HashMap<DeviceId, bool>> = RefCell::new(HashMap::new());
    }
    cached(&HOPPER_GPUS, dev.id(), || {
        let cc = dev.cuda_stream().context().compute_capability();
        Ok(cc.is_ok_and(|cc| cc == (9, 0)))
    })
    .unwrap_or(false)
}

thread_local! {
    /// Kernels by device and name, looked up in the module once: a UNet call launches
    /// hundreds of them, and the lookup would otherwise be a driver call each time.
    static FUNCTIONS: RefCell<HashMap<DeviceId, HashMap<String, CudaFunction>>> =
        RefCell::new(HashMap::new());
}

/// The kernel `name` of `kernels/fused.cu` on `dev`.
fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    function_with(dev, Kernels::Fused, name, |_| Ok(()))
}

/// The kernel `name` of `kernels` on `dev`, with `setup` (its attributes) applied once,
/// when it is first looked up.
fn function_with(
    dev: &CudaDevice,
    kernels: Kernels,
    name: &str,
    setup: impl FnOnce(&CudaFunction) -> Result<()>,
) -> Result<CudaFunction> {
    let found = FUNCTIONS.with(|f| f.borrow().get(&dev.id()).and_then(|m| m.get(name).cloned()));
    if let Some(func) = found {
        return Ok(func);
    }
    let func = module(dev, kernels)?.load_function(name).map_err(driver)?;
    setup(&func)?;
    FUNCTIONS.with(|f| {
        f.borrow_mut()
            .entry(dev.id())
            .or_default()
            .insert(name.to_owned(), func.clone())
    });
    Ok(func)
}

/// `CustomOp3` for an op with `run::<T>(x, xl, a, al, b, bl)` over the listed types.
macro_rules! ternary_op {
    ($op:ty, $name:literal, $cpu:literal, $what:literal, [$($dtype:ident => $ty:ty),+]) => {
        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                Err(fail($cpu))
            }

            fn cuda_fwd(
                &self,
                xs: &CudaStorage,
                xl: &Layout,
                a: &CudaStorage,
                al: &Layout,
                b: &CudaStorage,
                bl: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                match xs.dtype() {
                    $(DType::$dtype => self.run::<$ty>(xs, xl, a, al, b, bl),)+
                    other => Err(fail(format!(concat!($what, " for {:?}"), other))),
                }
            }
        }
    };
}

/// `CustomOp2` for an op with `run::<T>(x, xl, a, al)` over f16, bf16 and f32 (both inputs
/// of one type; `run` reads the second as that type).
macro_rules! binary_op {
    ($op:ty, $name:literal, $cpu:literal, $what:literal) => {
        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                Err(fail($cpu))
            }

            fn cuda_fwd(
                &self,
                xs: &CudaStorage,
                xl: &Layout,
                a: &CudaStorage,
                al: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                if a.dtype() != xs.dtype() {
                    return Err(fail(concat!($what, " across two types")));
                }
                match xs.dtype() {
                    DType::F16 => self.run::<f16>(xs, xl, a, al),
                    DType::BF16 => self.run::<bf16>(xs, xl, a, al),
                    DType::F32 => self.run::<f32>(xs, xl, a, al),
                    other => Err(fail(format!(concat!($what, " for {:?}"), other))),
                }
            }
        }
    };
}

fn driver(e: cudarc::driver::DriverError) -> candle_core::Error {
    fail(format!("{e:?}"))
}

/// A kernel's output as a candle storage and its shape.
fn output<T: Element>(
    out: CudaSlice<T>,
    device: CudaDevice,
    shape: impl Into<Shape>,
) -> (CudaStorage, Shape) {
    (
        CudaStorage {
            slice: T::wrap(out),
            device,
        },
        shape.into(),
    )
}

/// A CUDA tensor's storage, read-locked, and its layout.
fn cuda_storage(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, &Layout)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cuda(_) => Ok((storage, layout)),
        _ => Err(fail("a weight is not on the GPU")),
    }
}

fn as_cuda<'a>(storage: &'a candle_core::StorageRef<'_>) -> Result<&'a CudaStorage> {
    match &**storage {
        candle_core::Storage::Cuda(s) => Ok(s),
        _ => Err(fail("a weight is not on the GPU")),
    }
}

/// Launches `name` (suffixed with the type) over one input and a new output of `out_len`.
fn launch_unary<T: Element>(
    storage: &CudaStorage,
    layout: &Layout,
    name: &str,
    out_len: usize,
    config: LaunchConfig,
    args: &[i64],
    what: &str,
) -> Result<CudaSlice<T>> {
    let dev = storage.device().clone();
    let x = view::<T>(storage, layout, what)?;
    let func = function(&dev, &format!("{name}_{}", T::SUFFIX))?;
    // SAFETY: the kernels write every output element.
    let mut out = unsafe { dev.alloc::<T>(out_len)? };
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&x).arg(&mut out);
    // The kernels take `int` sizes, then an `int64_t` total where they have one.
    let ints: Vec<i32> = args.iter().take(1).map(|&a| a as i32).collect();
    let longs: Vec<i64> = args.iter().skip(1).copied().collect();
    for a in &ints {
        launch.arg(a);
    }
    for a in &longs {
        launch.arg(a);
    }
    // SAFETY: the callers size the grid and the output for the kernel's indexing.
    unsafe { launch.launch(config) }.map_err(driver)?;
    Ok(out)
}

macro_rules! unary_op {
    ($op:ty, $name:literal) => {
        impl candle_core::CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                Err(fail(concat!($name, " runs on CUDA only")))
            }

            fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
                match s.dtype() {
                    DType::F16 => self.run::<f16>(s, l),
                    DType::BF16 => self.run::<bf16>(s, l),
                    DType::F32 => self.run::<f32>(s, l),
                    other => Err(fail(format!("no {} for {other:?}", $name))),
                }
            }
        }
    };
}

mod attention;
mod conv;
mod copies;
mod graph;
mod linear;
mod norm;
mod rows;

pub(crate) use attention::{attention, fused_attention, time_kernels};
pub(crate) use conv::conv2d;
pub(crate) use copies::{concat_last, upsample2x_last};
pub(crate) use graph::Graphs;
pub(crate) use linear::linear;
pub(crate) use norm::{group_norm, layer_norm, LAYER_NORM_MAX_COLS};
pub(crate) use rows::{geglu, softmax_last_dim};

#[cfg(test)]
mod tests;
