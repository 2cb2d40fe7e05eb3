#!/usr/bin/env bash
# On the lent GPU machine: diffusers reference fixtures for a tiny model, and the CUDA build
# of `sparkle` on the full-size SD 1.5 architecture (random weights). Expects in .carry/:
# whl/diffusers-*.whl, bin/sparkle.xz (built with --features cuda), and tiny model dirs.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
PY=python3; [ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
# Each argument: ARCH, or ARCH:STEPS:GUIDANCE for few-step models (e.g. sdxl-turbo:2:0).
for spec in "$@"; do
  IFS=: read -r arch steps guidance <<<"$spec"
  extra=()
  [ -n "${steps:-}" ] && extra+=(--steps "$steps")
  [ -n "${guidance:-}" ] && extra+=(--guidance "$guidance")
  CUDA_VISIBLE_DEVICES= $PY tools/reference/diffusers_reference.py ".carry/tiny-$arch" "$OUT/$arch" "${extra[@]}" || exit 1
done
[ -n "${FIXTURES_ONLY:-}" ] && exit 0

source "$(dirname "$0")/env.sh"
xz -dc .carry/bin/sparkle.xz > /tmp/sparkle && chmod +x /tmp/sparkle
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
/tmp/sparkle model tiny /tmp/full15 --full-size 2>&1 | tail -1
for run in 1 2; do
  /tmp/sparkle generate "a corgi, style of monet" -o "$OUT/full15-$run.png" --model /tmp/full15 \
    --size 512x512 --steps 25 --seed 7 --scheduler ddim --device cuda 2>&1 | tail -1
done
