//! Convolutions through cuDNN over channels-last maps, plans cached per shape, and the
//! epilogue kernel that adds the bias, a per-image bias and the residual in one pass.

use super::*;
use candle_core::CustomOp3;
use cudarc::cudnn::{
    sys as dnn, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor,
};
use std::any::Any;

thread_local! {
    /// cuDNN handles are neither `Send` nor `Sync`: one per thread and device, as candle does.
    static CUDNN: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    /// Convolution plans by shape (`Plan<T>` behind `Any`).
    static PLANS: RefCell<HashMap<PlanKey, Box<dyn Any>>> = RefCell::new(HashMap::new());
    /// One workspace per device, grown to the largest plan's need.
    static WORKSPACE: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

fn cudnn(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    cached(&CUDNN, dev.id(), || {
        graph::refuse_while_recording("a cuDNN handle")?;
        Cudnn::new(dev.cuda_stream()).map_err(|e| fail(format!("cuDNN: {e:?}")))
    })
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
                    graph::refuse_while_recording("a cuDNN workspace")?;
                    // SAFETY: cuDNN's workspace needs no initial contents.
                    let space = unsafe { dev.alloc::<u8>(plan.workspace.max(1))? };
                    // Recordings that used the old one would use freed memory.
                    if spaces.insert(dev.id(), space).is_some() {
                        graph::retire_all();
                    }
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
        let func = function(&dev, &format!("bias_add_last{vec}_{}", T::SUFFIX))?;
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
        Ok(output::<T>(out, dev, out_dims.to_vec()))
    }
}

ternary_op!(
    ConvOp,
    "sparkle-conv2d",
    "the cuDNN convolution runs on CUDA only",
    "no convolution",
    [F16 => f16, BF16 => bf16, F32 => f32]
);
