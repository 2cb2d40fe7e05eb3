//! The engine's own GPU kernels timed on their own, for `sparkle bench attention`: what a
//! whole denoising step cannot tell apart.

use crate::{DeviceChoice, EngineError, Precision};

/// One attention problem: `batch` rows of `queries` attending over `keys`, in `heads` heads
/// `head_dim` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// The two products' floating-point operations (the softmax's not counted).
    pub fn flops(&self) -> f64 {
        4.0 * (self.batch * self.heads * self.queries * self.keys * self.head_dim) as f64
    }
}

/// One kernel's time on one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionTiming {
    pub shape: AttentionShape,
    /// The kernel, as `SPARKLE_HOPPER_ATTENTION` names it (`0: mma.sync`, …).
    pub kernel: &'static str,
    /// Seconds per call.
    pub seconds: f64,
}

/// Times every attention kernel the GPU has on each shape: the mean of `repeat` calls after
/// an untimed one. CUDA builds and 16-bit precisions only; heads a multiple of 8 wide.
pub fn time_attention(
    device: DeviceChoice,
    precision: Precision,
    shapes: &[AttentionShape],
    repeat: usize,
) -> Result<Vec<AttentionTiming>, EngineError> {
    let invalid = |why: &str| Err(EngineError::InvalidRequest(why.into()));
    let dtype = match precision {
        Precision::Auto | Precision::F16 => candle_core::DType::F16,
        Precision::Bf16 => candle_core::DType::BF16,
        Precision::F32 => return invalid("the attention kernels run in f16 or bf16"),
    };
    if repeat == 0 {
        return invalid("repeat at least once");
    }
    if let Some(bad) = shapes.iter().find(|s| {
        [s.batch, s.queries, s.keys, s.heads, s.head_dim].contains(&0)
            || !s.head_dim.is_multiple_of(8)
            || s.head_dim > 160
    }) {
        return Err(EngineError::InvalidRequest(format!(
            "no attention kernel for {bad:?}: every size at least 1, heads a multiple of 8 and at most 160 wide"
        )));
    }
    time_on(device, dtype, shapes, repeat)
}

#[cfg(feature = "cuda")]
fn time_on(
    device: DeviceChoice,
    dtype: candle_core::DType,
    shapes: &[AttentionShape],
    repeat: usize,
) -> Result<Vec<AttentionTiming>, EngineError> {
    let device = match device {
        DeviceChoice::Cpu => {
            return Err(EngineError::InvalidRequest(
                "the attention kernels run on CUDA only".into(),
            ))
        }
        DeviceChoice::Auto => crate::pipeline::cuda_device(0)?,
        DeviceChoice::Cuda(n) => crate::pipeline::cuda_device(n)?,
    };
    let mut rows = Vec::new();
    for &shape in shapes {
        let dims = (
            shape.batch,
            shape.queries,
            shape.keys,
            shape.heads,
            shape.head_dim,
        );
        for (kernel, seconds) in crate::cuda::time_kernels(&device, dtype, dims, repeat)? {
            rows.push(AttentionTiming {
                shape,
                kernel,
                seconds,
            });
        }
    }
    Ok(rows)
}

/// Without the CUDA build there is no kernel to time, whatever the device asked for.
#[cfg(not(feature = "cuda"))]
fn time_on(
    _: DeviceChoice,
    _: candle_core::DType,
    _: &[AttentionShape],
    _: usize,
) -> Result<Vec<AttentionTiming>, EngineError> {
    Err(EngineError::InvalidRequest(
        "timing the attention kernels needs the CUDA build".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(head_dim: usize) -> AttentionShape {
        AttentionShape {
            batch: 2,
            queries: 4096,
            keys: 77,
            heads: 8,
            head_dim,
        }
    }

    fn refusal(precision: Precision, shapes: &[AttentionShape], repeat: usize) -> String {
        match time_attention(DeviceChoice::Cpu, precision, shapes, repeat) {
            Err(EngineError::InvalidRequest(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_refused_before_any_device_is_touched() {
        assert!(refusal(Precision::F32, &[shape(40)], 5).contains("f16 or bf16"));
        assert!(refusal(Precision::F16, &[shape(40)], 0).contains("repeat"));
        for bad in [shape(0), shape(44), shape(168)] {
            let why = refusal(Precision::F16, &[shape(40), bad], 5);
            assert!(
                why.contains(&format!("head_dim: {}", bad.head_dim)),
                "{why}"
            );
        }
        let why = refusal(Precision::Bf16, &[shape(40)], 5);
        let expected = if crate::CUDA {
            "CUDA only"
        } else {
            "needs the CUDA build"
        };
        assert!(why.contains(expected), "{why}");
    }

    #[test]
    fn flops_count_both_products() {
        // Q·Kᵀ and P·V: 2·n·m·d multiply-adds each, per row and head.
        assert_eq!(shape(40).flops(), 4.0 * 2.0 * 8.0 * 4096.0 * 77.0 * 40.0);
    }
}
