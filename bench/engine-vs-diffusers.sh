#!/usr/bin/env bash
# `sparkle bench engine` and the diffusers baseline side by side, on one GPU, on the same
# full-size random-weight SD 1.5 model, in one run:
#
#   bash bench/engine-vs-diffusers.sh            # on a machine with an NVIDIA GPU
#
# Expects the CUDA build of sparkle as $SPARKLE (default: .carry/bin/sparkle.xz, unpacked) and
# diffusers importable (or its wheel under .carry/whl/). Environment:
#   BATCH=1,4,8,16  STEPS=25  SIZE=512x512  REPEAT=2  PRECISION=f16  SCHEDULER=ddim (or euler)
#   ARCH=sd1.5      or sdxl (then SIZE=1024x1024 suits it): the random-weight model's architecture
#   DIFFUSERS=0     skip the diffusers baseline
#   COMPILED=1,8    also diffusers with the UNet compiled (torch.compile, reduce-overhead) at
#                   these batch sizes, each in a process of its own (compiled once per size)
#   RECIPE=1        the compiled runs with diffusers' speed recipe too (channels_last, fused
#                   QKV, 1×1 convolutions as matrix products)
#   COMPILE_TIMEOUT=300  seconds each compiled batch size may take, compilation included
#   COLD=1          first measure the cold start: a new process, an empty kernel cache
#   CHECK=1         check the device against the CPU in f32 on the same weights first
#   PROFILE=N       afterwards, an Nsight Compute kernel profile of one batch of N with one step
#   OUT=DIR         where results go (default ./bench-out)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-./bench-out}; mkdir -p "$OUT"
BATCH=${BATCH:-1,4,8,16}; STEPS=${STEPS:-25}; SIZE=${SIZE:-512x512}; REPEAT=${REPEAT:-2}
PRECISION=${PRECISION:-f16}; SCHEDULER=${SCHEDULER:-ddim}
source "$(dirname "$0")/../tools/device/env.sh"
if ! $PY -c 'import diffusers' 2>/dev/null && ls .carry/whl/diffusers-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -z "${SPARKLE:-}" ]; then
  SPARKLE=/tmp/sparkle; xz -dc .carry/bin/sparkle.xz > $SPARKLE && chmod +x $SPARKLE
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
ARCH=${ARCH:-sd1.5}
MODEL=/tmp/$ARCH-full
[ -d $MODEL ] || $SPARKLE model tiny $MODEL --arch "$ARCH" --full-size >/dev/null 2>&1 || exit 1
du -sh $MODEL

if [ "${COLD:-0}" = 1 ]; then
  echo "## cold start: new process, empty kernel cache, load to first image (1 image, $STEPS steps)"
  export CUDA_CACHE_PATH=$(mktemp -d)
  /usr/bin/time -f "%e s wall" $SPARKLE generate "a corgi, style of monet" -o "$OUT/cold.png" --model $MODEL \
    --size "$SIZE" --steps "$STEPS" --seed 7 --scheduler "$SCHEDULER" --device cuda --precision "$PRECISION" 2>&1 | grep -v INFO | tail -2
  echo "## again, kernel cache warm"
  /usr/bin/time -f "%e s wall" $SPARKLE generate "a corgi, style of monet" -o "$OUT/warm.png" --model $MODEL \
    --size "$SIZE" --steps "$STEPS" --seed 7 --scheduler "$SCHEDULER" --device cuda --precision "$PRECISION" 2>&1 | grep -v INFO | tail -2
fi

echo "## sparkle"
$SPARKLE bench engine --model $MODEL --batch "$BATCH" --steps "$STEPS" --size "$SIZE" --scheduler "$SCHEDULER" \
  --device cuda --precision "$PRECISION" --repeat "$REPEAT" ${CHECK:+--check} 2>&1 | grep -v INFO
dtype=fp16; [ "$PRECISION" = bf16 ] && dtype=bf16   # diffusers' name for the precision
if [ "${DIFFUSERS:-1}" = 1 ]; then
  echo "## diffusers"
  $PY bench/diffusers_baseline.py --model $MODEL --batch "$BATCH" --steps "$STEPS" --size "$SIZE" \
    --dtype $dtype --scheduler "$SCHEDULER" --repeat "$REPEAT" --json "$OUT/diffusers.json" 2>&1 | grep -v -i warn
fi

if [ -n "${COMPILED:-}" ]; then
  for b in ${COMPILED//,/ }; do
    echo "## diffusers, UNet compiled${RECIPE:+ with the recipe}, batch $b (timeout ${COMPILE_TIMEOUT:-300} s)"
    timeout "${COMPILE_TIMEOUT:-300}" $PY bench/diffusers_baseline.py --model $MODEL --batch "$b" --steps "$STEPS" \
      --size "$SIZE" --dtype $dtype --scheduler "$SCHEDULER" --repeat "$REPEAT" --compile ${RECIPE:+--recipe} \
      --json "$OUT/diffusers-compiled-b$b.json" 2>&1 | grep -v -i warn
    [ "${PIPESTATUS[0]}" = 124 ] && echo "batch $b: compilation and run exceeded ${COMPILE_TIMEOUT:-300} s"
  done
fi

if [ -n "${PROFILE:-}" ]; then
  echo "## kernel profile: batch ${PROFILE}, 1 step, CFG (warm-up round and timed round)"
  # Without the GEMM search: under the profiler each of its timed candidates is a profiled
  # launch too, which takes minutes (the heuristic's first choice is profiled instead).
  SPARKLE_GEMM_SEARCH=0 timeout ${PROFILE_TIMEOUT:-240} ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    --log-file "$OUT/ncu.csv" $SPARKLE bench engine --model $MODEL --batch "$PROFILE" --steps 1 --size "$SIZE" \
    --device cuda --precision "$PRECISION" --repeat 1 >/dev/null 2>&1
  $PY bench/kernel_table.py "$OUT/ncu.csv" --unet-step --top ${TOP:-25}
fi
