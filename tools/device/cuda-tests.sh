#!/usr/bin/env bash
# On the lent GPU machine: the engine's CUDA tests — every kernel against the CPU in f32 at
# the models' shapes and odd ones (f16, bf16, f32), attention against the formula, recorded
# graphs against eager passes, whole pipelines (SD 1.5 and SDXL architectures) against the
# CPU. Expects .carry/bin/engine-tests.xz from tools/device/build-cuda.sh. Run it whenever
# CUDA code changes, before measuring. One test at a time: the tests share the device's
# context, and a fault in one would otherwise be reported by whichever runs beside it.
#   bash tools/device/cuda-tests.sh [FILTER]     # FILTER defaults to cuda::tests
set -uo pipefail
source "$(dirname "$0")/env.sh"
xz -dc .carry/bin/engine-tests.xz > /tmp/engine-tests && chmod +x /tmp/engine-tests || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
/tmp/engine-tests "${1:-cuda::tests}" --test-threads=1 --nocapture 2>&1 | grep -v " INFO "
exit "${PIPESTATUS[0]}"
