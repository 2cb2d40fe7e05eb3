#!/usr/bin/env bash
# On the lent GPU machine (H100 or H200): the CUDA tests, then the attention kernels side by
# side in one call — the mma.sync kernel (SPARKLE_HOPPER_ATTENTION=0), the plain warpgroup
# kernel (=1), the pipelined one (=2) and that in blocks of one warpgroup (=3) — on SD 1.5
# and SDXL, and the CPU check of the pipelined one. Expects .carry/bin/sparkle.xz and .carry/bin/engine-tests.xz
# (tools/device/build-cuda.sh). Every line also goes to $OUT/results.log.
#   SD15_BATCH=1,16  SDXL_BATCH=1,4  SD15_FORMS="0 1 2 3"  SDXL_FORMS="0 2 3"  SDXL=1  CHECK=1
#   TESTS=cuda::tests  ATTENTION_BATCH=16  bash tools/device/hopper-attention.sh
set -uo pipefail
OUT=${OUT:-./bench-out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/results.log") 2>&1
source "$(dirname "$0")/env.sh"
rows() { grep -v " INFO " | grep -E '^\| [0-9]|cold|check|rror|WARN|eager|panick'; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
xz -dc .carry/bin/sparkle.xz > /tmp/new && chmod +x /tmp/new || exit 1
/tmp/new model tiny /tmp/f15 --full-size >/dev/null 2>&1 &
made=$!
echo "## CUDA tests"; timeout 120 bash tools/device/cuda-tests.sh "${TESTS:-cuda::tests}" > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
grep -E "test result|FAILED|panicked|warpgroup|refused|recorded|eager passes|UNet pass 0|run 0" "$OUT/tests.log" | head -60
if [ "${CHECK:-1}" = 1 ]; then
  echo "## pipelines against the CPU with the pipelined warpgroup attention"
  SPARKLE_HOPPER_ATTENTION=2 timeout 60 /tmp/engine-tests pipelines_match --test-threads=1 --nocapture 2>&1 |
    grep -E "sd1.5|sdxl|test result|panicked" | head -20
fi
echo "## the attention kernels alone, batch ${ATTENTION_BATCH:-16}"
timeout 90 /tmp/new bench attention --batch "${ATTENTION_BATCH:-16}" 2>&1 | grep -v " INFO "
# Only the model's maker: a bare `wait` would wait for the `tee` above too, which never ends.
wait "$made" || exit 1
B=(bench engine --model /tmp/f15 --steps 25 --size 512x512 --scheduler ddim --device cuda --repeat 2)
for form in ${SD15_FORMS:-0 1 2 3}; do
  echo "## SD 1.5, SPARKLE_HOPPER_ATTENTION=$form"
  SPARKLE_HOPPER_ATTENTION=$form timeout 60 /tmp/new "${B[@]}" --batch "${SD15_BATCH:-1,16}" 2>&1 | rows
done
if [ "${CHECK:-1}" = 1 ]; then
  echo "## check, SPARKLE_HOPPER_ATTENTION=2"
  SPARKLE_HOPPER_ATTENTION=2 timeout 90 /tmp/new "${B[@]}" --batch 1 --check 2>&1 | rows
fi
rm -rf /tmp/f15
[ "${SDXL:-1}" = 1 ] || exit 0
/tmp/new model tiny /tmp/fxl --arch sdxl --full-size >/dev/null 2>&1 || exit 1
X=(bench engine --model /tmp/fxl --steps 20 --size 1024x1024 --scheduler euler --device cuda --repeat 1)
for form in ${SDXL_FORMS:-0 2 3}; do
  echo "## SDXL, SPARKLE_HOPPER_ATTENTION=$form"
  SPARKLE_HOPPER_ATTENTION=$form timeout 60 /tmp/new "${X[@]}" --batch "${SDXL_BATCH:-1,4}" 2>&1 | rows
done
