//! A network's forward pass recorded as a CUDA graph, once per input shape, and replayed:
//! one launch instead of the hundreds of kernel launches (and the host's work around each)
//! that a small batch is otherwise bound by.
//!
//! The first call at a shape runs eagerly, so every plan, workspace and kernel the pass
//! needs exists; the second records the pass on the device's stream into buffers of its
//! own — inputs copied in, the output copied out — and every later call copies its inputs
//! into those buffers and launches the graph. The pass's own tensors are allocated and freed
//! inside the graph (stream-ordered allocation is recorded as graph memory nodes), so the
//! recording holds no pointer to memory it does not own, except the network's weights and
//! the kernels' workspaces: a workspace that is ever replaced retires every recording
//! ([`retire_all`]), and the weights live as long as the network that holds the graphs.
//!
//! Anything a cache would allocate while recording would be memory the graph owns; such a
//! miss refuses ([`refuse_while_recording`]) and the shape stays eager.

use super::*;
use candle_core::Device;
use cudarc::driver::{sys, CudaGraph};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Bumped whenever memory a recording may point at is freed.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// Forgets every recording: called when a workspace they may use is replaced.
pub(super) fn retire_all() {
    EPOCH.fetch_add(1, Ordering::SeqCst);
}

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is recording a graph.
pub(super) fn recording() -> bool {
    RECORDING.with(Cell::get)
}

/// An error when this thread is recording a graph: a cache must not allocate memory then.
pub(super) fn refuse_while_recording(what: &str) -> Result<()> {
    if recording() {
        return Err(fail(format!(
            "{what} would be allocated while recording a graph"
        )));
    }
    Ok(())
}

/// Latent pixels (rows × height × width of the first input, `[rows, c, h, w]`) up to which
/// a pass is recorded — SD 1.5 at 512² up to 8 rows (4 images with guidance), SDXL at 1024²
/// up to 2: beyond, the GPU's time dwarfs the launches, and a recording keeps the memory of
/// its pass's activations for as long as it is kept.
const MAX_PIXELS: usize = 8 * 64 * 64;
/// Recordings kept per network, most recently used last.
const MAX_GRAPHS: usize = 4;

/// Whether graphs are used: unless `SPARKLE_CUDA_GRAPHS=0` (every pass eager, for
/// comparison).
fn enabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !env_is(&OFF, "SPARKLE_CUDA_GRAPHS", "0")
}

/// The recordings of one network's forward pass, by input shapes.
#[derive(Default)]
pub(crate) struct Graphs {
    entries: Mutex<Vec<Entry>>,
}

type Key = Vec<(Vec<usize>, DType)>;

struct Entry {
    key: Key,
    epoch: u64,
    state: State,
}

enum State {
    /// Run once, eagerly; the output's shape and type.
    Seen(Shape, DType),
    Recorded(Recorded),
    /// Recording failed (logged once; the reason kept for the tests): this shape runs
    /// eagerly.
    Eager(#[cfg_attr(not(test), allow(dead_code))] String),
}

struct Recorded {
    inputs: Vec<Tensor>,
    output: Tensor,
    graph: Exec,
}

/// The instantiated graph. The driver's graph objects may be launched from any thread
/// with the context current, which cudarc's `launch` makes it; the `Mutex` around the
/// entries keeps launches one at a time.
struct Exec(CudaGraph);

// SAFETY: see `Exec`; the raw handles are only used under the entries' lock.
unsafe impl Send for Exec {}

impl Graphs {
    /// `forward(inputs)`, from a recording where there is one for these shapes.
    pub(crate) fn run(
        &self,
        inputs: &[&Tensor],
        forward: impl Fn(&[&Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Some(Device::Cuda(dev)) = inputs.first().map(|t| t.device()) else {
            return forward(inputs);
        };
        if !enabled()
            || inputs[0].elem_count() / inputs[0].dims().get(1).copied().unwrap_or(1).max(1)
                > MAX_PIXELS
            || !inputs
                .iter()
                .all(|t| t.device().same_device(inputs[0].device()))
        {
            return forward(inputs);
        }
        // candle uploads the shapes and strides of its strided kernels from the host on every
        // call; a recording would keep pointing at host memory long gone. With this guard
        // they are uploaded once per layout and kept on the device (and a layout first met
        // while recording fails the recording instead).
        let _uploads = dev.enable_cuda_graph_htod_cache();
        let key: Key = inputs
            .iter()
            .map(|t| (t.dims().to_vec(), t.dtype()))
            .collect();
        let epoch = EPOCH.load(Ordering::SeqCst);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let kept = entries.len();
        entries.retain(|e| e.epoch == epoch);
        if entries.len() < kept {
            release_memory(dev);
        }
        let Some(at) = entries.iter().position(|e| e.key == key) else {
            let out = forward(inputs)?;
            if entries.len() >= MAX_GRAPHS {
                entries.remove(0);
                release_memory(dev);
            }
            entries.push(Entry {
                key,
                epoch,
                state: State::Seen(out.shape().clone(), out.dtype()),
            });
            return Ok(out);
        };
        let mut entry = entries.remove(at);
        let out = match &entry.state {
            State::Eager(_) => forward(inputs),
            State::Recorded(recorded) => recorded.replay(inputs),
            State::Seen(shape, dtype) => {
                match Recorded::new(dev, inputs, shape, *dtype, &forward) {
                    Ok(recorded) => {
                        let out = recorded.replay(inputs);
                        entry.state = State::Recorded(recorded);
                        out
                    }
                    Err(e) => {
                        tracing::warn!(shapes = ?entry.key, "running eagerly, the pass could not be recorded: {e}");
                        entry.state = State::Eager(e.to_string());
                        forward(inputs)
                    }
                }
            }
        };
        entries.push(entry);
        out
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        let entries = std::mem::take(self.entries.get_mut().unwrap_or_else(|e| e.into_inner()));
        let device = entries.iter().find_map(|e| match &e.state {
            State::Recorded(r) => Some(r.output.device().clone()),
            _ => None,
        });
        drop(entries);
        if let Some(Device::Cuda(dev)) = device {
            release_memory(&dev);
        }
    }
}

/// Hands the memory of recordings that are gone back to the device (the driver keeps a
/// graph's memory for reuse until told otherwise).
fn release_memory(dev: &CudaDevice) {
    let ctx = dev.cuda_stream().context().clone();
    // Frees only what no graph holds; the stream's pending work is unaffected.
    if ctx.bind_to_thread().is_ok() {
        // SAFETY: a plain driver call on this context's device.
        let _ = unsafe { sys::cuDeviceGraphMemTrim(ctx.cu_device()) };
    }
}

#[cfg(test)]
impl Graphs {
    /// How many shapes have a recording, and why the others that tried have none.
    pub(crate) fn recorded(&self) -> (usize, Vec<String>) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = entries
            .iter()
            .filter(|e| matches!(e.state, State::Recorded(_)))
            .count();
        let refused = entries
            .iter()
            .filter_map(|e| match &e.state {
                State::Eager(why) => Some(format!("{:?}: {why}", e.key)),
                _ => None,
            })
            .collect();
        (recorded, refused)
    }
}

impl Recorded {
    fn new(
        dev: &CudaDevice,
        inputs: &[&Tensor],
        shape: &Shape,
        dtype: DType,
        forward: &impl Fn(&[&Tensor]) -> Result<Tensor>,
    ) -> Result<Recorded> {
        let device = inputs[0].device();
        let inputs = inputs
            .iter()
            .map(|t| {
                let mine = Tensor::zeros(t.shape(), t.dtype(), device)?;
                mine.slice_set(&t.contiguous()?, 0, 0)?;
                Ok(mine)
            })
            .collect::<Result<Vec<_>>>()?;
        let output = Tensor::zeros(shape, dtype, device)?;
        let stream = dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver)?;
        RECORDING.with(|r| r.set(true));
        let pass = (|| {
            let views: Vec<&Tensor> = inputs.iter().collect();
            let out = forward(&views)?;
            output.slice_set(&out.contiguous()?, 0, 0)
        })();
        RECORDING.with(|r| r.set(false));
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        if pass.is_err() || graph.is_err() {
            // Frees that failed inside the abandoned recording leave their error with the
            // context, where the next eager call would find it: it belongs to the recording.
            let _ = stream.context().check_err();
        }
        pass?;
        let graph = graph
            .map_err(driver)?
            .ok_or_else(|| fail("the recorded graph is empty"))?;
        Ok(Recorded {
            inputs,
            output,
            graph: Exec(graph),
        })
    }

    /// Copies `inputs` into the recording's, launches it, and copies its output out (the
    /// next launch overwrites the recording's own).
    fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        for (mine, input) in self.inputs.iter().zip(inputs) {
            mine.slice_set(&input.contiguous()?, 0, 0)?;
        }
        self.graph.0.launch().map_err(driver)?;
        self.output.copy()
    }
}
