#!/usr/bin/env bash
# On the lent GPU machine (on its CPU, where torch and diffusers' dependencies are): diffusers'
# reference fixtures for the tiny models, written under DIR (default
# crates/engine/tests/fixtures): image-to-image and inpainting, LoRAs in the kohya-ss and PEFT
# layouts (loaded by diffusers' own load_lora_weights) and a textual-inversion embedding
# (load_textual_inversion). Name fixtures after DIR to make only those. Expects .carry/whl/ to
# hold the wheels of diffusers (and, for the LoRAs, peft, accelerate, psutil and pyyaml), and
# SPARKLE, a `sparkle` binary of any build, to write the tiny models.
#
#   bash tools/device/image-fixtures.sh [DIR [FIXTURE ...]]
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT_DIR=${1:-crates/engine/tests/fixtures}
shift || true
ONLY=" $* "
SPARKLE=${SPARKLE:-target/release/sparkle}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site
PY=python3; [ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
models=$(mktemp -d)
trap 'rm -rf "$models"' EXIT
reference() {
  local fixture=$1 arch=$2 script=$3
  shift 3
  [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $fixture "* ]] || return 0
  [ -d "$models/$arch" ] || "$SPARKLE" model tiny --arch "$arch" --seed 0 "$models/$arch" >/dev/null
  CUDA_VISIBLE_DEVICES= $PY "tools/reference/$script" "$models/$arch" "$OUT_DIR/$fixture" "$@"
}
reference sd15-img2img sd1.5 diffusers_image_reference.py --mode img2img --strength 0.5 0.75
reference sd15-inpaint sd1.5 diffusers_image_reference.py --mode inpaint --strength 1.0 0.75
reference sd15-inpainting sd1.5-inpainting diffusers_image_reference.py --mode inpaint --strength 1.0
reference sdxl-img2img sdxl diffusers_image_reference.py --mode img2img --strength 0.5 0.75
reference sdxl-inpainting sdxl-inpainting diffusers_image_reference.py --mode inpaint --strength 1.0
reference sd15-lora-kohya sd1.5 diffusers_reference.py --schedulers euler euler_a --lora kohya --lora-weight 0.8
reference sd15-lora-peft sd1.5 diffusers_reference.py --schedulers ddim --lora peft --lora-weight 1.0
reference sd15-embedding sd1.5 diffusers_reference.py --schedulers euler --embedding corgistyle
