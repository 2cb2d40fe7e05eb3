//! Linear layers as one cuBLASLt product with the bias and residual in its epilogue.

use super::*;
use std::rc::Rc;

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
        graph::refuse_while_recording("the cuBLASLt workspace")?;
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
        Ok(output::<T>(out, dev, out_dims))
    }
}

binary_op!(
    LinearOp,
    "sparkle-linear",
    "the fused linear layer runs on CUDA only",
    "no linear layer"
);
