#!/usr/bin/env bash
# On the lent GPU machine: `sparkle bench engine` (CUDA build, carried as .carry/bin/sparkle.xz)
# on full-size random-weight models. Everything is built here beforehand; nothing compiles there.
#   bash tools/device/bench-engine.sh            # SD 1.5, SDXL, SDXL-Turbo
set -uo pipefail
source "$(dirname "$0")/env.sh"
xz -dc .carry/bin/sparkle.xz > /tmp/sparkle && chmod +x /tmp/sparkle
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
S=/tmp/sparkle
run() { echo "+ sparkle $*"; /usr/bin/time -f "  (%e s wall, %M KiB max RSS)" $S "$@" 2>&1 | grep -v " INFO "; }

run model tiny /tmp/full15 --full-size
run bench engine --model /tmp/full15 --batch ${SD15_BATCH:-1,4,8,16} --steps 25 --size 512x512 --scheduler ddim
run bench engine --model /tmp/full15 --batch 8 --steps 25 --size 512x512 --scheduler ddim --precision bf16 --repeat 1
rm -rf /tmp/full15

run model tiny /tmp/fullxl --arch sdxl --full-size
run bench engine --model /tmp/fullxl --batch ${SDXL_BATCH:-1,2} --steps 20 --size 1024x1024 --scheduler euler --repeat 1
rm -rf /tmp/fullxl
run model tiny /tmp/fullxlt --arch sdxl-turbo --full-size
run bench engine --model /tmp/fullxlt --batch 1,4 --steps 1 --size 512x512 --guidance 0 --scheduler euler
run generate "a corgi, style of monet" -o "$OUT/sdxl-turbo.png" --model /tmp/fullxlt --steps 1 --guidance 0 --seed 7
