//! Linear layers as one cuBLASLt product with the bias and residual in its epilogue.

use super::*;
use std::rc::Rc;

/// `xs·weightᵀ (+ bias) (+ residual)` as one cuBLASLt call: the bias is added in the
/// product's epilogue and the residual enters as its C operand (β = 1), so the output is
/// written once and never read back.
pub(crate) fn linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.contiguous()?;
    let weight = weight.to_dtype(dtype)?.contiguous()?;
    let op = LinearOp {
        // Without a bias the weight stands in for it; the flag says not to read it.
        bias: match bias {
            Some(b) => b.to_dtype(dtype)?.contiguous()?,
            None => weight.clone(),
        },
        with_bias: bias.is_some(),
        weight,
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
    with_bias: bool,
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
    /// Whether the epilogue adds a bias.
    bias: bool,
}

/// The descriptors and the algorithm of one linear shape, chosen once.
struct LtPlan {
    desc: lt::sys::cublasLtMatmulDesc_t,
    layouts: [lt::sys::cublasLtMatrixLayout_t; 3],
    algo: lt::sys::cublasLtMatmulAlgo_t,
}

/// Candidates asked of cuBLASLt's heuristic for a shape worth timing them on.
const SEARCHED: usize = 8;

/// Products of at least this many FLOPs have their algorithm chosen by timing the
/// heuristic's candidates on the first call (a few milliseconds, once per shape): SD 1.5's
/// linear layers from batch 2 up, SDXL's from batch 1. Smaller ones take the heuristic's
/// first answer, so that a worker's first small image waits for no search.
const SEARCH_FLOPS: f64 = 4e9;

/// Whether to search at all: unless `SPARKLE_GEMM_SEARCH=0` (the heuristic's first answer
/// everywhere, for comparison).
fn search_enabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !env_is(&OFF, "SPARKLE_GEMM_SEARCH", "0")
}

/// The device pointers of one product: weight, input, bias, C (residual or output),
/// output, workspace, and β.
#[derive(Clone, Copy)]
struct Operands {
    w: u64,
    x: u64,
    bias: Option<u64>,
    c: u64,
    out: u64,
    workspace: u64,
    beta: f32,
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
    /// The plan for `key`; with `search` (the operands of the call that needs it), the
    /// fastest of the heuristic's candidates on them, timed on `stream`.
    fn new<T: Element>(
        lt_handle: &Lt,
        key: &LtKey,
        search: Option<(&Operands, &cudarc::driver::CudaStream)>,
    ) -> Result<Self> {
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
        let epilogue = if key.bias {
            lt::sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            lt::sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // SAFETY: each value has its attribute's type.
        unsafe {
            desc_attr(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &transpose)?;
            desc_attr(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        }
        let pref = lt::result::create_matmul_pref().map_err(lt_err)?;
        let align = align as u32;
        let workspace = LT_WORKSPACE;
        let wanted = if search.is_some() { SEARCHED } else { 1 };
        // SAFETY: plain data, written by the heuristic below.
        let mut found: Vec<lt::sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; wanted];
        // SAFETY: the preference lives until the heuristic has answered; values typed.
        let count = unsafe {
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
                let mut count = 0;
                lt::sys::cublasLtMatmulAlgoGetHeuristic(
                    lt_handle.handle,
                    desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                    wanted as i32,
                    found.as_mut_ptr(),
                    &mut count,
                )
                .result()
                .map_err(lt_err)?;
                Ok(count.max(0) as usize)
            });
            let _ = lt::result::destroy_matmul_pref(pref);
            answer?
        };
        let candidates: Vec<_> = found[..count.min(wanted)]
            .iter()
            .filter(|h| h.state == lt::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|h| h.algo)
            .collect();
        plan.algo = *candidates
            .first()
            .ok_or_else(|| fail(format!("cuBLASLt has no algorithm for {:?}", key.dims)))?;
        if let (Some((operands, stream)), true) = (search, candidates.len() > 1) {
            plan.algo = plan.fastest(lt_handle, &candidates, operands, stream)?;
        }
        Ok(plan)
    }

    /// The candidate that runs these operands fastest (median of three runs after one to
    /// warm up; the output is overwritten by the call that follows).
    fn fastest(
        &self,
        lt_handle: &Lt,
        candidates: &[lt::sys::cublasLtMatmulAlgo_t],
        operands: &Operands,
        stream: &cudarc::driver::CudaStream,
    ) -> Result<lt::sys::cublasLtMatmulAlgo_t> {
        let ctx = stream.context();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (
            ctx.new_event(timing).map_err(driver)?,
            ctx.new_event(timing).map_err(driver)?,
        );
        let mut best = (f32::MAX, candidates[0]);
        for algo in candidates {
            let mut times = [0f32; 3];
            // A candidate that fails to run is passed over.
            if self.run(lt_handle, algo, operands, stream).is_err() {
                continue;
            }
            for time in &mut times {
                start.record(stream).map_err(driver)?;
                self.run(lt_handle, algo, operands, stream)?;
                end.record(stream).map_err(driver)?;
                *time = start.elapsed_ms(&end).map_err(driver)?;
            }
            times.sort_by(f32::total_cmp);
            if times[1] < best.0 {
                best = (times[1], *algo);
            }
        }
        Ok(best.1)
    }

    /// One product with `algo`.
    fn run(
        &self,
        lt_handle: &Lt,
        algo: &lt::sys::cublasLtMatmulAlgo_t,
        o: &Operands,
        stream: &cudarc::driver::CudaStream,
    ) -> Result<()> {
        let alpha = 1f32;
        // SAFETY: the pointers are live device allocations of the sizes the layouts name
        // (checked by the caller), the bias has as many elements as the product has
        // outputs per row, and the workspace has LT_WORKSPACE bytes.
        unsafe {
            if let Some(bias) = &o.bias {
                desc_attr(
                    self.desc,
                    lt::sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    bias,
                )?;
            }
            lt::result::matmul(
                lt_handle.handle,
                self.desc,
                (&alpha as *const f32).cast(),
                (&o.beta as *const f32).cast(),
                o.w as *const _,
                self.layouts[0],
                o.x as *const _,
                self.layouts[1],
                o.c as *const _,
                self.layouts[2],
                o.out as *mut _,
                self.layouts[2],
                algo,
                o.workspace as *mut _,
                LT_WORKSPACE,
                stream.cu_stream() as *mut _,
            )
            .map_err(lt_err)
        }
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
        if wk != k
            || (self.with_bias && bl.dims() != [n])
            || (self.residual && rl.dims() != out_dims.as_slice())
        {
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
            bias: self.with_bias,
        };
        let operands = Operands {
            w: w_ptr,
            x: x_ptr,
            bias: self.with_bias.then_some(b_ptr),
            c: c_ptr,
            out: o_ptr,
            workspace: ws_ptr,
            beta: if self.residual { 1.0 } else { 0.0 },
        };
        let plan = cached(&LT_PLANS, key, || {
            // Timing candidates synchronises with the device: never while recording.
            let search = search_enabled()
                && 2.0 * (rows * n * k) as f64 >= SEARCH_FLOPS
                && !graph::recording();
            let search = search.then_some((&operands, &*stream));
            Ok(Rc::new(LtPlan::new::<T>(&handle, &key, search)?))
        })?;
        plan.run(&handle, &plan.algo, &operands, &stream)?;
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
