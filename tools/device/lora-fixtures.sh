#!/usr/bin/env bash
# On the lent GPU machine (on its CPU, where torch and diffusers' dependencies are): diffusers'
# reference fixtures for LoRAs (kohya-ss and PEFT layouts, loaded by diffusers' own
# load_lora_weights) and a textual-inversion embedding (load_textual_inversion) on the tiny
# SD 1.5 model, written under DIR (default crates/engine/tests/fixtures). Expects
# .carry/whl/ to hold the wheels of diffusers, peft, accelerate and psutil, and SPARKLE, a
# `sparkle` binary of any build, to write the tiny model.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT_DIR=${1:-crates/engine/tests/fixtures}
SPARKLE=${SPARKLE:-target/release/sparkle}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site
PY=python3; [ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
model=$(mktemp -d)/sd15
"$SPARKLE" model tiny --arch sd1.5 --seed 0 "$model" >/dev/null
reference() {
  local fixture=$1
  shift
  CUDA_VISIBLE_DEVICES= $PY tools/reference/diffusers_reference.py "$model" "$OUT_DIR/$fixture" "$@"
}
reference sd15-lora-kohya --schedulers euler euler_a --lora kohya --lora-weight 0.8
reference sd15-lora-peft --schedulers ddim --lora peft --lora-weight 1.0
reference sd15-embedding --schedulers euler --embedding corgistyle
rm -rf "$(dirname "$model")"
