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
//! Everything here launches GPU work through raw pointers, hence the `unsafe` blocks; each
//! checks the shapes and contiguity its kernel assumes before launching.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use cudarc::cublaslt as lt;
use cudarc::cudnn::{
    sys as dnn, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor,
    TensorDescriptor,
};
use cudarc::driver::{CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

static FUSED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));

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
    /// cuDNN handles are neither `Send` nor `Sync`: one per thread and device, as candle does.
    static CUDNN: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    /// Convolution plans by shape (`Plan<T>` behind `Any`).
    static PLANS: RefCell<HashMap<PlanKey, Box<dyn Any>>> = RefCell::new(HashMap::new());
    /// One workspace per device, grown to the largest plan's need.
    static WORKSPACE: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
    static MODULES: RefCell<HashMap<DeviceId, Arc<CudaModule>>> = RefCell::new(HashMap::new());
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

fn cudnn(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    cached(&CUDNN, dev.id(), || {
        Cudnn::new(dev.cuda_stream()).map_err(|e| fail(format!("cuDNN: {e:?}")))
    })
}

fn module(dev: &CudaDevice) -> Result<Arc<CudaModule>> {
    cached(&MODULES, dev.id(), || {
        dev.cuda_stream()
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_binary(FUSED.to_vec()))
            .map_err(|e| fail(format!("loading the fused kernels: {e}")))
    })
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    device: DeviceId,
    dtype: DType,
    /// n, c, h, w of the input; k, kh, kw of the filter; padding; stride.
    dims: [usize; 9],
}

struct Plan<T: Element> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

fn driver(e: cudarc::driver::DriverError) -> candle_core::Error {
    fail(format!("{e:?}"))
}

fn dnn_err(e: impl std::fmt::Debug) -> candle_core::Error {
    fail(format!("cuDNN: {e:?}"))
}

fn as_i32(dims: [usize; 4]) -> Result<[i32; 4]> {
    let mut out = [0i32; 4];
    for (o, d) in out.iter_mut().zip(dims) {
        *o = i32::try_from(d).map_err(|_| fail("a dimension beyond i32"))?;
    }
    Ok(out)
}

impl<T: Element> Plan<T> {
    fn new(dnn: &Arc<Cudnn>, key: &PlanKey) -> Result<Self> {
        let [n, c, h, w, k, kh, kw, pad, stride] = key.dims;
        let (oh, ow) = (
            (h + 2 * pad - kh) / stride + 1,
            (w + 2 * pad - kw) / stride + 1,
        );
        let (pad, stride) = (pad as i32, stride as i32);
        // Channels-last tensors and a KRSC filter (cuDNN takes the dimensions in NCHW order
        // whatever the format).
        let format = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let mut conv = dnn
            .create_conv2d::<f32>(
                [pad, pad],
                [stride, stride],
                [1, 1],
                dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(dnn_err)?;
        let math = if T::TENSOR_OPS {
            dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else {
            dnn::cudnnMathType_t::CUDNN_DEFAULT_MATH
        };
        conv.set_math_type(math).map_err(dnn_err)?;
        let x = dnn
            .create_4d_tensor::<T>(format, as_i32([n, c, h, w])?)
            .map_err(dnn_err)?;
        let wd = dnn
            .create_4d_filter::<T>(format, as_i32([k, c, kh, kw])?)
            .map_err(dnn_err)?;
        let y = dnn
            .create_4d_tensor::<T>(format, as_i32([n, k, oh, ow])?)
            .map_err(dnn_err)?;
        let forward = ConvForward {
            conv: &conv,
            x: &x,
            w: &wd,
            y: &y,
        };
        let algo = forward.pick_algorithm().map_err(dnn_err)?;
        let workspace = forward.get_workspace_size(algo).map_err(dnn_err)?;
        Ok(Plan {
            conv,
            x,
            w: wd,
            y,
            algo,
            workspace,
        })
    }
}

/// `conv2d(xs, weight) + bias (+ channel_bias[n, c]) (+ residual)` over a channels-last map
/// `[n, h, w, c]` with a `[k, kh, kw, c]` weight, square padding and stride: the convolution
/// through cuDNN (whose fast kernels are channels-last: no layout conversion on the way),
/// the rest in one pass over its output.
pub(crate) fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
    residual: Option<&Tensor>,
    channel_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.contiguous()?;
    let op = ConvOp {
        weight: weight.to_dtype(dtype)?.contiguous()?,
        bias: bias.to_dtype(dtype)?.contiguous()?,
        padding,
        stride,
        residual: residual.is_some(),
        channel_bias: channel_bias.is_some(),
    };
    // Absent operands are stood in for by the input, which the flags say not to read.
    let residual = match residual {
        Some(r) => r.to_dtype(dtype)?.contiguous()?,
        None => xs.clone(),
    };
    let channel_bias = match channel_bias {
        // One row for the whole batch (a time embedding of one time step) is broadcast.
        Some(t) => t
            .to_dtype(dtype)?
            .broadcast_as((xs.dim(0)?, weight.dim(0)?))?
            .contiguous()?,
        None => xs.clone(),
    };
    xs.apply_op3_no_bwd(&residual, &channel_bias, &op)
}

struct ConvOp {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
    residual: bool,
    channel_bias: bool,
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

impl ConvOp {
    fn run<T: Element>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let (w_guard, wl) = cuda_storage(&self.weight)?;
        let (b_guard, bl) = cuda_storage(&self.bias)?;
        let (ws, bs) = (as_cuda(&w_guard)?, as_cuda(&b_guard)?);
        let (&[n, h, w, c], &[k, kh, kw, wc]) = (xl.dims(), wl.dims()) else {
            return Err(fail(format!(
                "conv2d input and weight must be [n, h, w, c] and [k, kh, kw, c]: {:?} {:?}",
                xl.dims(),
                wl.dims()
            )));
        };
        if wc != c || bl.dims() != [k] || h + 2 * self.padding < kh || w + 2 * self.padding < kw {
            return Err(fail(format!(
                "conv2d shapes {:?} * {:?} + {:?}",
                xl.dims(),
                wl.dims(),
                bl.dims()
            )));
        }
        let (oh, ow) = (
            (h + 2 * self.padding - kh) / self.stride + 1,
            (w + 2 * self.padding - kw) / self.stride + 1,
        );
        let out_dims = [n, oh, ow, k];
        if self.residual && rl.dims() != out_dims {
            return Err(fail(format!(
                "residual {:?} for a {out_dims:?} output",
                rl.dims()
            )));
        }
        if self.channel_bias && cl.dims().iter().product::<usize>() != n * k {
            return Err(fail(format!("per-image bias {:?} for {n}×{k}", cl.dims())));
        }
        let x = view::<T>(xs, xl, "conv2d input")?;
        let wv = view::<T>(ws, wl, "conv2d weight")?;
        let b = view::<T>(bs, bl, "conv2d bias")?;
        let residual = view::<T>(rs, rl, "residual")?;
        let channel_bias = view::<T>(cs, cl, "per-image bias")?;
        let key = PlanKey {
            device: dev.id(),
            dtype: xs.dtype(),
            dims: [n, c, h, w, k, kh, kw, self.padding, self.stride],
        };
        let dnn = cudnn(&dev)?;
        let elements = n * k * oh * ow;
        // SAFETY: every element is written by the convolution below before it is read.
        let mut out = unsafe { dev.alloc::<T>(elements)? };
        PLANS.with(|plans| -> Result<()> {
            let mut plans = plans.borrow_mut();
            let plan = match plans.entry(key) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(Box::new(Plan::<T>::new(&dnn, &key)?))
                }
            };
            let plan = plan
                .downcast_ref::<Plan<T>>()
                .ok_or_else(|| fail("convolution plan of another type"))?;
            WORKSPACE.with(|spaces| -> Result<()> {
                let mut spaces = spaces.borrow_mut();
                let small = spaces
                    .get(&dev.id())
                    .is_none_or(|s| s.len() < plan.workspace);
                if small {
                    // SAFETY: cuDNN's workspace needs no initial contents.
                    let space = unsafe { dev.alloc::<u8>(plan.workspace.max(1))? };
                    spaces.insert(dev.id(), space);
                }
                let space = spaces
                    .get_mut(&dev.id())
                    .ok_or_else(|| fail("no workspace"))?;
                let forward = ConvForward {
                    conv: &plan.conv,
                    x: &plan.x,
                    w: &plan.w,
                    y: &plan.y,
                };
                // SAFETY: the descriptors were made for exactly these shapes and this type,
                // and the views are contiguous.
                unsafe {
                    forward
                        .launch(plan.algo, Some(space), (T::ONE, T::ZERO), &x, &wv, &mut out)
                        .map_err(dnn_err)
                }
            })
        })?;
        let stream = dev.cuda_stream();
        let vec = vec8(&stream, [&b, &residual, &channel_bias], k);
        let func = module(&dev)?
            .load_function(&format!("bias_add_last{vec}_{}", T::SUFFIX))
            .map_err(driver)?;
        let (channels, hw) = (k as i32, (oh * ow) as i32);
        let (with_residual, with_channel_bias) =
            (i32::from(self.residual), i32::from(self.channel_bias));
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&mut out)
            .arg(&b)
            .arg(&residual)
            .arg(&with_residual)
            .arg(&channel_bias)
            .arg(&with_channel_bias)
            .arg(&channels)
            .arg(&hw);
        // SAFETY: blocks (x, image) over n images of oh·ow·k elements of `out` and, when
        // read, `residual`, `vec` at a time and aligned to it (`vec8`); `b` holds k values
        // and, when read, `channel_bias` n·k.
        unsafe { launch.launch(image_grid(n, oh * ow * k, vec)?) }.map_err(driver)?;
        drop((w_guard, b_guard));
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: dev,
            },
            Shape::from(out_dims.to_vec()),
        ))
    }
}

ternary_op!(
    ConvOp,
    "sparkle-conv2d",
    "the cuDNN convolution runs on CUDA only",
    "no convolution",
    [F16 => f16, BF16 => bf16, F32 => f32]
);

/// GroupNorm over a channels-last map `[b, …, c]`, then SiLU when `silu`.
pub(crate) fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let weight = weight.to_dtype(xs.dtype())?.contiguous()?;
    let bias = bias.to_dtype(xs.dtype())?.contiguous()?;
    xs.apply_op3_no_bwd(&weight, &bias, &NormOp { groups, eps, silu })
}

struct NormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Channels the GroupNorm kernel's scale and shift fit for: 48 KiB of shared memory, what
/// a kernel may use without asking.
const GROUP_NORM_MAX_CHANNELS: usize = 6144;

impl NormOp {
    fn run<T: Element>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let dims = xl.dims();
        let (Some(&b), Some(&c), true) = (dims.first(), dims.last(), dims.len() > 1) else {
            return Err(fail("GroupNorm input must be [b, …, c]"));
        };
        let hw: usize = dims.iter().product::<usize>() / (b * c).max(1);
        let groups = self.groups;
        if groups == 0 || c % groups != 0 || wl.dims() != [c] || bl.dims() != [c] {
            return Err(fail(format!("GroupNorm of {dims:?} in {groups} groups")));
        }
        if hw * c > i32::MAX as usize || b > 65_535 || c > GROUP_NORM_MAX_CHANNELS {
            return Err(fail(format!("GroupNorm of {b} images of {hw}×{c}")));
        }
        let x = view::<T>(xs, xl, "GroupNorm input")?;
        let gamma = view::<T>(ws, wl, "GroupNorm weight")?;
        let beta = view::<T>(bs, bl, "GroupNorm bias")?;
        let cpg = c / groups;
        let module = module(&dev)?;
        let stream = dev.cuda_stream();
        let mut stats = dev.alloc_zeros::<f64>(2 * b * groups)?;
        // SAFETY: the kernel below writes every element.
        let mut out = unsafe { dev.alloc::<T>(b * hw * c)? };
        let vec = vec8(&stream, [&x, &gamma, &beta, &out.slice(..)], c);
        let (hw32, c32, cpg32, groups32, eps) = (
            hw as i32,
            c as i32,
            cpg as i32,
            groups as i32,
            self.eps as f32,
        );
        let stats_fn = module
            .load_function(&format!("group_stats_last{vec}_{}", T::SUFFIX))
            .map_err(driver)?;
        // Statistics: about a thousand blocks in all, each a slice of one image's pixels.
        let splits = (1024 / b).clamp(1, hw.div_ceil(16).max(1)) as u32;
        let mut launch = stream.launch_builder(&stats_fn);
        launch
            .arg(&x)
            .arg(&mut stats)
            .arg(&hw32)
            .arg(&c32)
            .arg(&cpg32)
            .arg(&groups32);
        let config = LaunchConfig {
            grid_dim: (splits, b as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (2 * groups * 4) as u32,
        };
        // SAFETY: blocks (split, image) read pixel slices of b images of hw·c elements,
        // `vec` channels at a time and aligned to it; they add into 2·b·groups doubles.
        unsafe { launch.launch(config) }.map_err(driver)?;
        let name = format!(
            "group_apply{}_last{vec}_{}",
            if self.silu { "_silu" } else { "" },
            T::SUFFIX
        );
        let apply = module.load_function(&name).map_err(driver)?;
        let mut launch = stream.launch_builder(&apply);
        launch
            .arg(&x)
            .arg(&stats)
            .arg(&gamma)
            .arg(&beta)
            .arg(&mut out)
            .arg(&hw32)
            .arg(&c32)
            .arg(&cpg32)
            .arg(&groups32)
            .arg(&eps);
        let mut config = image_grid(b, hw * c, vec)?;
        config.shared_mem_bytes = (2 * c * 4) as u32;
        // SAFETY: blocks (x, image) over b images of hw·c elements of `x` and `out`, `vec`
        // at a time and aligned to it; channels below c (≤ GROUP_NORM_MAX_CHANNELS, the
        // shared scale and shift), groups below b·groups.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: dev,
            },
            xl.shape().clone(),
        ))
    }
}

ternary_op!(
    NormOp,
    "sparkle-group-norm",
    "the fused GroupNorm runs on CUDA only",
    "no GroupNorm",
    [F16 => f16, BF16 => bf16, F32 => f32]
);

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
    let func = module(&dev)?
        .load_function(&format!("{name}_{}", T::SUFFIX))
        .map_err(driver)?;
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

/// Rows up to this long are held in registers by the softmax kernel.
const SOFTMAX_MAX_COLS: usize = 128 * 64;

/// Softmax over the last dimension of a contiguous tensor, f32 arithmetic.
pub(crate) fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let cols = xs.dim(candle_core::D::Minus1)?;
    if !accelerated(xs) || cols > SOFTMAX_MAX_COLS || cols == 0 {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    xs.contiguous()?.apply_op1_no_bwd(&SoftmaxOp)
}

struct SoftmaxOp;

impl SoftmaxOp {
    fn run<T: Element>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let cols = *l.dims().last().ok_or_else(|| fail("softmax of a scalar"))?;
        let rows = n / cols;
        let per_thread = [1usize, 8, 32, 64]
            .into_iter()
            .find(|e| e * 128 >= cols)
            .ok_or_else(|| fail("softmax row too long"))?;
        let config = LaunchConfig {
            grid_dim: (
                u32::try_from(rows).map_err(|_| fail("too many rows"))?,
                1,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("softmax_{per_thread}");
        let out = launch_unary::<T>(s, l, &name, n, config, &[cols as i64], "softmax input")?;
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: s.device().clone(),
            },
            l.shape().clone(),
        ))
    }
}

/// `value · GELU(gate)` of a `[…, 2·inner]` projection whose first half is the value.
pub(crate) fn geglu(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&GegluOp)
}

struct GegluOp;

impl GegluOp {
    fn run<T: Element>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = l.dims();
        let last = *dims.last().ok_or_else(|| fail("GEGLU of a scalar"))?;
        if last % 2 != 0 {
            return Err(fail("GEGLU needs an even last dimension"));
        }
        let inner = last / 2;
        let n = l.shape().elem_count() / 2;
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(132 * 64) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let out = launch_unary::<T>(
            s,
            l,
            "geglu",
            n,
            config,
            &[inner as i64, n as i64],
            "GEGLU input",
        )?;
        let mut shape = dims.to_vec();
        if let Some(d) = shape.last_mut() {
            *d = inner;
        }
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: s.device().clone(),
            },
            Shape::from(shape),
        ))
    }
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

/// Grid of 256-thread blocks over `total` output vectors (the loops stride past the grid).
fn vector_grid(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (total.div_ceil(256).clamp(1, 132 * 32) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A size the copy kernels index with `int`, or an error.
fn int_total(total: usize, what: &str) -> Result<i32> {
    i32::try_from(total).map_err(|_| fail(format!("{what} of {total} vectors is too large")))
}

/// Nearest-neighbour upsampling by two of a channels-last map `[b, h, w, c]`: one pass,
/// 16 bytes per access where the channels allow.
pub(crate) fn upsample2x_last(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Upsample2xOp)
}

struct Upsample2xOp;

impl Upsample2xOp {
    fn run<T: Element>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let &[b, h, w, c] = l.dims() else {
            return Err(fail(format!(
                "upsampling needs [b, h, w, c], not {:?}",
                l.dims()
            )));
        };
        let dev = s.device().clone();
        let x = view::<T>(s, l, "upsampling input")?;
        let stream = dev.cuda_stream();
        let elements = b * 4 * h * w * c;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(elements)? };
        let vec = vec8(&stream, [&x, &out.slice(..)], c);
        let total = int_total(elements / vec, "upsampling")?;
        let func = module(&dev)?
            .load_function(&format!("upsample2x_last{vec}_{}", T::SUFFIX))
            .map_err(driver)?;
        let (h32, w32, c32) = (h as i32, w as i32, c as i32);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&x)
            .arg(&mut out)
            .arg(&h32)
            .arg(&w32)
            .arg(&c32)
            .arg(&total);
        // SAFETY: `total` vectors of `vec` elements are written, each read from inside the
        // b·h·w·c input; `vec` divides c and both pointers are aligned to it (`vec8`).
        unsafe { launch.launch(vector_grid(total as usize)) }.map_err(driver)?;
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: dev,
            },
            Shape::from((b, 2 * h, 2 * w, c)),
        ))
    }
}

unary_op!(Upsample2xOp, "sparkle-upsample2x");

/// `a` and `b` side by side along their last dimension (every other dimension equal).
pub(crate) fn concat_last(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &ConcatOp)
}

struct ConcatOp;

impl ConcatOp {
    fn run<T: Element>(
        &self,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (ad, bd) = (al.dims(), bl.dims());
        let (Some((&ca, arest)), Some((&cb, brest))) = (ad.split_last(), bd.split_last()) else {
            return Err(fail("concatenation of scalars"));
        };
        if arest != brest {
            return Err(fail(format!("concatenation of {ad:?} and {bd:?}")));
        }
        let rows: usize = arest.iter().product();
        let dev = as_.device().clone();
        let (a, b) = (
            view::<T>(as_, al, "concatenated input")?,
            view::<T>(bs, bl, "concatenated input")?,
        );
        let stream = dev.cuda_stream();
        let elements = rows * (ca + cb);
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(elements)? };
        let vec = vec8(&stream, [&a, &b, &out.slice(..)], ca.min(cb));
        let vec = if (ca % vec, cb % vec) == (0, 0) {
            vec
        } else {
            1
        };
        let total = int_total(elements / vec, "concatenation")?;
        let func = module(&dev)?
            .load_function(&format!("concat_last{vec}_{}", T::SUFFIX))
            .map_err(driver)?;
        let (ca32, cb32) = (ca as i32, cb as i32);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&a)
            .arg(&b)
            .arg(&mut out)
            .arg(&ca32)
            .arg(&cb32)
            .arg(&total);
        // SAFETY: `total` vectors are written, each read from inside `rows` rows of `a` (ca
        // wide) or `b` (cb wide); `vec` divides both widths and the pointers are aligned.
        unsafe { launch.launch(vector_grid(total as usize)) }.map_err(driver)?;
        let mut shape = arest.to_vec();
        shape.push(ca + cb);
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: dev,
            },
            Shape::from(shape),
        ))
    }
}

binary_op!(
    ConcatOp,
    "sparkle-concat",
    "the concatenation kernel runs on CUDA only",
    "no concatenation"
);

/// Widest rows [`layer_norm`] takes (the kernel holds 8·32·8 values per row).
pub(crate) const LAYER_NORM_MAX_COLS: usize = 2048;

/// LayerNorm over the last dimension of `xs` (contiguous, starting 16-byte aligned, the
/// last dimension a multiple of 8 up to [`LAYER_NORM_MAX_COLS`]): one warp per row.
pub(crate) fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let (weight, bias) = (
        weight.to_dtype(dtype)?.contiguous()?,
        bias.to_dtype(dtype)?.contiguous()?,
    );
    xs.apply_op3_no_bwd(&weight, &bias, &LayerNormOp { eps })
}

struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    fn run<T: Element>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let cols = *xl
            .dims()
            .last()
            .ok_or_else(|| fail("LayerNorm of a scalar"))?;
        let rows = xl.shape().elem_count() / cols.max(1);
        let x = view::<T>(xs, xl, "LayerNorm input")?;
        let gamma = view::<T>(ws, wl, "LayerNorm weight")?;
        let beta = view::<T>(bs, bl, "LayerNorm bias")?;
        let stream = dev.cuda_stream();
        if wl.dims() != [cols]
            || bl.dims() != [cols]
            || cols > LAYER_NORM_MAX_COLS
            || vec8(&stream, [&x, &gamma, &beta], cols) != 8
        {
            return Err(fail(format!(
                "LayerNorm of {:?} needs 16-bit rows of a multiple of 8 up to {LAYER_NORM_MAX_COLS}, aligned",
                xl.dims()
            )));
        }
        let func = module(&dev)?
            .load_function(&format!("layer_norm_{}", T::SUFFIX))
            .map_err(driver)?;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(rows * cols)? };
        let (cols32, rows64, eps) = (cols as i32, rows as i64, self.eps as f32);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&x)
            .arg(&gamma)
            .arg(&beta)
            .arg(&mut out)
            .arg(&cols32)
            .arg(&rows64)
            .arg(&eps);
        let config = LaunchConfig {
            grid_dim: (rows.div_ceil(8).clamp(1, 132 * 32) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: a warp per row over `rows` rows of `cols` elements of x and out, 8 at a
        // time and aligned to it (checked above); gamma and beta hold `cols`.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: dev,
            },
            xl.shape().clone(),
        ))
    }
}

ternary_op!(
    LayerNormOp,
    "sparkle-layer-norm",
    "the fused LayerNorm runs on CUDA only",
    "no fused LayerNorm",
    [F16 => f16, BF16 => bf16]
);

unary_op!(SoftmaxOp, "sparkle-softmax");
unary_op!(GegluOp, "sparkle-geglu");

/// Head widths the attention kernel is built for (d rounded up to one of these).
const FLASH_WIDTHS: [usize; 5] = [48, 64, 80, 128, 160];

/// 16-query tiles per warp for heads `dp` wide: two up to 64 (each K and V fragment serves
/// both, halving shared-memory traffic per query), one above (registers).
/// `SPARKLE_FLASH_ROWS=1` forces one, for comparison.
fn flash_rows(dp: usize) -> usize {
    static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let one = *ONE.get_or_init(|| std::env::var("SPARKLE_FLASH_ROWS").is_ok_and(|v| v == "1"));
    if dp <= 64 && !one {
        2
    } else {
        1
    }
}

/// Whether [`attention`] takes these: f16 or bf16 on CUDA, heads a multiple of 8 and at
/// most 160 wide (every Stable Diffusion UNet's), unless `SPARKLE_FLASH_ATTENTION=0` asks
/// for the score matrix through cuBLAS instead.
pub(crate) fn fused_attention(q: &Tensor, head_dim: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*OFF.get_or_init(|| std::env::var("SPARKLE_FLASH_ATTENTION").is_ok_and(|v| v == "0"))
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && head_dim.is_multiple_of(8)
        && head_dim <= FLASH_WIDTHS[FLASH_WIDTHS.len() - 1]
}

/// `softmax(q·kᵀ·scale)·v` per head without the score matrix: q `[b, n, heads·d]`, k and
/// v `[b, m, heads·d]` (the projections as they come), out `[b, n, heads·d]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3_no_bwd(&k, &v, &AttentionOp { heads, scale })
}

struct AttentionOp {
    heads: usize,
    scale: f64,
}

impl AttentionOp {
    fn run<T: Element>(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = qs.device().clone();
        let (&[b, n, width], &[kb, m, kw]) = (ql.dims(), kl.dims()) else {
            return Err(fail("attention inputs must be [b, n, heads·d]"));
        };
        let heads = self.heads;
        if heads == 0 || width % heads != 0 || kb != b || kw != width || vl.dims() != kl.dims() {
            return Err(fail(format!(
                "attention shapes {:?} {:?} {:?} with {heads} heads",
                ql.dims(),
                kl.dims(),
                vl.dims()
            )));
        }
        let d = width / heads;
        // 16-byte rows for `cp.async`: heads a multiple of 8 wide, tensors starting aligned.
        if !d.is_multiple_of(8)
            || [ql, kl, vl]
                .iter()
                .any(|l| !l.start_offset().is_multiple_of(8))
        {
            return Err(fail(format!(
                "attention heads {d} wide or inputs not 16-byte aligned"
            )));
        }
        let dp = FLASH_WIDTHS
            .into_iter()
            .find(|&w| w >= d)
            .ok_or_else(|| fail(format!("no attention kernel for heads {d} wide")))?;
        let rt = flash_rows(dp);
        let block_queries = 64 * rt;
        let (q, k, v) = (
            view::<T>(qs, ql, "queries")?,
            view::<T>(ks, kl, "keys")?,
            view::<T>(vs, vl, "values")?,
        );
        // Heads narrower than the kernel's width (SD 1.5's 40 in 48) get the row sums from
        // a column of ones beside V; that form is built for the 64×64 layers' shape.
        let ones = if d < dp && (dp, rt) == (48, 2) {
            "p"
        } else {
            ""
        };
        let func = module(&dev)?
            .load_function(&format!("flash_attention_{dp}x{rt}{ones}_{}", T::SUFFIX))
            .map_err(driver)?;
        // The kernel's shared memory: the Q tile and one K and V tile per stage (two up to
        // heads 128 wide, as the kernel), rows padded by 16 bytes.
        let stages = if dp <= 128 { 2 } else { 1 };
        let bytes = (block_queries + 2 * 64 * stages) * (dp + 8) * std::mem::size_of::<T>();
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(driver)?;
        // SAFETY: every output element is written by the kernel.
        let mut out = unsafe { dev.alloc::<T>(b * n * width)? };
        let stream = dev.cuda_stream();
        let (heads32, n32, m32, d32) = (heads as i32, n as i32, m as i32, d as i32);
        let (q_batch, q_row, kv_batch, kv_row) = (
            (n * width) as i64,
            width as i64,
            (m * width) as i64,
            width as i64,
        );
        let scale_log2 = (self.scale * std::f64::consts::LOG2_E) as f32;
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&mut out)
            .arg(&heads32)
            .arg(&n32)
            .arg(&m32)
            .arg(&d32)
            .arg(&q_batch)
            .arg(&q_row)
            .arg(&kv_batch)
            .arg(&kv_row)
            .arg(&scale_log2);
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(block_queries) as u32, (b * heads) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        // SAFETY: one block per 64·rt queries of one (image, head); reads stay below n and m
        // rows and d columns of each head, writes below n rows.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: dev,
            },
            Shape::from((b, n, width)),
        ))
    }
}

ternary_op!(
    AttentionOp,
    "sparkle-attention",
    "the fused attention runs on CUDA only",
    "no fused attention",
    [F16 => f16, BF16 => bf16]
);

/// `xs·weightᵀ + bias (+ residual)` as one cuBLASLt call: the bias is added in the
/// product's epilogue and the residual enters as its C operand (β = 1), so the output is
/// written once and never read back.
pub(crate) fn linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.contiguous()?;
    let op = LinearOp {
        weight: weight.to_dtype(dtype)?.contiguous()?,
        bias: bias.to_dtype(dtype)?.contiguous()?,
        residual: residual.is_some(),
    };
    // Without a residual the input stands in for it; the flag says not to read it.
    let residual = match residual {
        Some(r) => r.to_dtype(dtype)?.contiguous()?,
        None => xs.clone(),
    };
    xs.apply_op2_no_bwd(&residual, &op)
}

struct LinearOp {
    weight: Tensor,
    bias: Tensor,
    residual: bool,
}

/// A cuBLASLt handle and its workspace (32 MiB, what Hopper's kernels may ask for).
struct Lt {
    handle: lt::sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `create_handle` and is dropped once.
        let _ = unsafe { lt::result::destroy_handle(self.handle) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LtKey {
    device: DeviceId,
    dtype: DType,
    /// Rows of the input, output features, input features, and the smallest alignment of
    /// the operands' addresses (bytes, at most 256).
    dims: [usize; 4],
}

/// The descriptors and the algorithm of one linear shape, chosen once.
struct LtPlan {
    desc: lt::sys::cublasLtMatmulDesc_t,
    layouts: [lt::sys::cublasLtMatrixLayout_t; 3],
    algo: lt::sys::cublasLtMatmulAlgo_t,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: each handle was created for this plan and is destroyed once.
        unsafe {
            let _ = lt::result::destroy_matmul_desc(self.desc);
            for layout in self.layouts {
                let _ = lt::result::destroy_matrix_layout(layout);
            }
        }
    }
}

thread_local! {
    static LT: RefCell<HashMap<DeviceId, Rc<Lt>>> = RefCell::new(HashMap::new());
    static LT_PLANS: RefCell<HashMap<LtKey, Rc<LtPlan>>> = RefCell::new(HashMap::new());
}

fn lt_err(e: lt::result::CublasError) -> candle_core::Error {
    fail(format!("cuBLASLt: {e:?}"))
}

fn lt_handle(dev: &CudaDevice) -> Result<Rc<Lt>> {
    cached(&LT, dev.id(), || {
        Ok(Rc::new(Lt {
            handle: lt::result::create_handle().map_err(lt_err)?,
            workspace: dev
                .cuda_stream()
                .alloc_zeros::<u8>(LT_WORKSPACE)
                .map_err(driver)?,
        }))
    })
}

const LT_WORKSPACE: usize = 32 << 20;

/// # Safety
/// `value` must be the attribute's type.
unsafe fn desc_attr<V>(
    desc: lt::sys::cublasLtMatmulDesc_t,
    attr: lt::sys::cublasLtMatmulDescAttributes_t,
    value: &V,
) -> Result<()> {
    lt::result::set_matmul_desc_attribute(
        desc,
        attr,
        (value as *const V).cast(),
        std::mem::size_of::<V>(),
    )
    .map_err(lt_err)
}

impl LtPlan {
    fn new<T: Element>(lt_handle: &Lt, key: &LtKey) -> Result<Self> {
        use lt::sys::cublasLtMatmulDescAttributes_t as Attr;
        use lt::sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let [rows, n, k, align] = key.dims;
        let desc = lt::result::create_matmul_desc(
            lt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt::sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(lt_err)?;
        let mut plan = LtPlan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            // SAFETY: plain data, filled in by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
        };
        let (n64, k64, rows64) = (n as u64, k as u64, rows as u64);
        // Column-major: the weight `[n, k]` is k×n (transposed by the product), the input
        // `[rows, k]` is k×rows, the output and residual `[rows, n]` are n×rows.
        for (slot, (r, c, ld)) in plan.layouts.iter_mut().zip([
            (k64, n64, k as i64),
            (k64, rows64, k as i64),
            (n64, rows64, n as i64),
        ]) {
            *slot = lt::result::create_matrix_layout(T::LT_TYPE, r, c, ld).map_err(lt_err)?;
        }
        let transpose = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        let epilogue = lt::sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        // SAFETY: each value has its attribute's type.
        unsafe {
            desc_attr(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &transpose)?;
            desc_attr(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        }
        let pref = lt::result::create_matmul_pref().map_err(lt_err)?;
        let align = align as u32;
        let workspace = LT_WORKSPACE;
        // SAFETY: the preference lives until the heuristic has answered; values typed.
        let heuristic = unsafe {
            let set = |attr, value: *const std::ffi::c_void, size| {
                lt::result::set_matmul_pref_attribute(pref, attr, value, size).map_err(lt_err)
            };
            let answer = set(
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                for attr in [
                    Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    set(
                        attr,
                        (&align as *const u32).cast(),
                        std::mem::size_of::<u32>(),
                    )?;
                }
                lt::result::get_matmul_algo_heuristic(
                    lt_handle.handle,
                    desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                )
                .map_err(lt_err)
            });
            let _ = lt::result::destroy_matmul_pref(pref);
            answer?
        };
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

impl LinearOp {
    fn run<T: Element>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let dev = xs.device().clone();
        let (w_guard, wl) = cuda_storage(&self.weight)?;
        let (b_guard, bl) = cuda_storage(&self.bias)?;
        let (&k, lead) = xl
            .dims()
            .split_last()
            .ok_or_else(|| fail("a linear layer of a scalar"))?;
        let &[n, wk] = wl.dims() else {
            return Err(fail("a linear weight must be [out, in]"));
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(n);
        if wk != k || bl.dims() != [n] || (self.residual && rl.dims() != out_dims.as_slice()) {
            return Err(fail(format!(
                "linear {:?} · {:?}ᵀ + {:?} + {:?}",
                xl.dims(),
                wl.dims(),
                bl.dims(),
                rl.dims()
            )));
        }
        let rows: usize = lead.iter().product();
        let x = view::<T>(xs, xl, "linear input")?;
        let w = view::<T>(as_cuda(&w_guard)?, wl, "linear weight")?;
        let bias = view::<T>(as_cuda(&b_guard)?, bl, "linear bias")?;
        let residual = view::<T>(rs, rl, "residual")?;
        // SAFETY: the product writes every element.
        let mut out = unsafe { dev.alloc::<T>(rows * n)? };
        let stream = dev.cuda_stream();
        let handle = lt_handle(&dev)?;
        let (x_ptr, _x) = x.device_ptr(&stream);
        let (w_ptr, _w) = w.device_ptr(&stream);
        let (b_ptr, _b) = bias.device_ptr(&stream);
        let (r_ptr, _r) = residual.device_ptr(&stream);
        let (ws_ptr, _ws) = handle.workspace.device_ptr(&stream);
        let (o_ptr, _o) = out.device_ptr_mut(&stream);
        let c_ptr = if self.residual { r_ptr } else { o_ptr };
        let align = [x_ptr, w_ptr, c_ptr, o_ptr]
            .iter()
            .map(|&p| 1usize << p.trailing_zeros().min(8))
            .min()
            .unwrap_or(256);
        let key = LtKey {
            device: dev.id(),
            dtype: T::DTYPE,
            dims: [rows, n, k, align],
        };
        let plan = cached(&LT_PLANS, key, || {
            Ok(Rc::new(LtPlan::new::<T>(&handle, &key)?))
        })?;
        let (alpha, beta) = (1f32, if self.residual { 1f32 } else { 0f32 });
        // SAFETY: the pointers are live device allocations of the sizes the layouts name
        // (checked above), the bias has n elements, and the workspace has LT_WORKSPACE bytes.
        unsafe {
            desc_attr(
                plan.desc,
                lt::sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &b_ptr,
            )?;
            lt::result::matmul(
                handle.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w_ptr as *const _,
                plan.layouts[0],
                x_ptr as *const _,
                plan.layouts[1],
                c_ptr as *const _,
                plan.layouts[2],
                o_ptr as *mut _,
                plan.layouts[2],
                &plan.algo,
                ws_ptr as *mut _,
                LT_WORKSPACE,
                stream.cu_stream() as *mut _,
            )
            .map_err(lt_err)?;
        }
        drop((_x, _w, _b, _r, _ws, _o));
        drop((w_guard, b_guard));
        Ok((
            CudaStorage {
                slice: T::wrap(out),
                device: dev,
            },
            Shape::from(out_dims),
        ))
    }
}

binary_op!(
    LinearOp,
    "sparkle-linear",
    "the fused linear layer runs on CUDA only",
    "no linear layer"
);
