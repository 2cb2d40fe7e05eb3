#!/usr/bin/env bash
# On the lent GPU machine: one engine build against another in the same call, then the CUDA
# tests. Expects .carry/bin/sparkle.xz and .carry/bin/engine-tests.xz (tools/device/build-cuda.sh)
# and the build to compare with as .carry/bin/sparkle-base.xz. Every line also goes to
# $OUT/results.log, so a run cut short still brings back what it measured.
#   SD15_BATCH=1,8,16  SDXL_BATCH=1,4  SDXL=1  NEW_ENV="SPARKLE_CUDA_GRAPHS=0"
#   bash tools/device/engine-ab.sh
set -uo pipefail
OUT=${OUT:-./bench-out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/results.log") 2>&1
source "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
xz -dc .carry/bin/sparkle.xz > /tmp/new && xz -dc .carry/bin/sparkle-base.xz > /tmp/base && chmod +x /tmp/new /tmp/base || exit 1
rows() { grep -v " INFO " | grep -E '^\| [0-9]|cold|check|rror|WARN|eager|panick'; }
NEW_ENV=${NEW_ENV:-}
/tmp/new model tiny /tmp/f15 --full-size >/dev/null 2>&1 || exit 1
B=(bench engine --model /tmp/f15 --steps 25 --size 512x512 --scheduler ddim --device cuda --repeat 3)
echo "## SD 1.5, base"; timeout 90 /tmp/base "${B[@]}" --batch "${SD15_BATCH:-1,8,16}" 2>&1 | rows
echo "## SD 1.5, new ($NEW_ENV)"; env $NEW_ENV timeout 120 /tmp/new "${B[@]}" --batch "${SD15_BATCH:-1,8,16}" 2>&1 | rows
echo "## SD 1.5, new, eager (SPARKLE_CUDA_GRAPHS=0 SPARKLE_GEMM_SEARCH=0)"; SPARKLE_CUDA_GRAPHS=0 SPARKLE_GEMM_SEARCH=0 timeout 90 /tmp/new "${B[@]}" --batch 1 2>&1 | rows
echo "## SD 1.5, base again"; timeout 60 /tmp/base "${B[@]}" --batch 1 2>&1 | rows
echo "## CUDA tests"; timeout 240 bash tools/device/cuda-tests.sh > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
grep -E "test result|FAILED|panicked|running eagerly" "$OUT/tests.log" | head -20
env $NEW_ENV timeout 120 /tmp/new "${B[@]}" --batch 1 --check 2>&1 | rows
rm -rf /tmp/f15
[ "${SDXL:-1}" = 1 ] || exit 0
/tmp/new model tiny /tmp/fxl --arch sdxl --full-size >/dev/null 2>&1 || exit 1
X=(bench engine --model /tmp/fxl --steps 20 --size 1024x1024 --scheduler euler --device cuda --repeat 2)
echo "## SDXL, new ($NEW_ENV)"; env $NEW_ENV timeout 120 /tmp/new "${X[@]}" --batch "${SDXL_BATCH:-1,4}" 2>&1 | rows
echo "## SDXL, base"; timeout 90 /tmp/base "${X[@]}" --batch "${SDXL_BATCH:-1,4}" 2>&1 | rows
