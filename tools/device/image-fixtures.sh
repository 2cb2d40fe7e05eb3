#!/usr/bin/env bash
# On the lent GPU machine (on its CPU, where torch and diffusers' dependencies are): diffusers'
# image-to-image and inpainting reference fixtures for the tiny models, written under DIR
# (default crates/engine/tests/fixtures). Expects .carry/whl/diffusers-*.whl and SPARKLE, a
# `sparkle` binary of any build, to write the tiny models.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT_DIR=${1:-crates/engine/tests/fixtures}
SPARKLE=${SPARKLE:-target/release/sparkle}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site
PY=python3; [ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
models=$(mktemp -d)
reference() {
  local fixture=$1 arch=$2
  shift 2
  [ -d "$models/$arch" ] || "$SPARKLE" model tiny --arch "$arch" --seed 0 "$models/$arch" >/dev/null
  CUDA_VISIBLE_DEVICES= $PY tools/reference/diffusers_image_reference.py "$models/$arch" \
    "$OUT_DIR/$fixture" "$@"
}
reference sd15-img2img sd1.5 --mode img2img --strength 0.5 0.75
reference sd15-inpaint sd1.5 --mode inpaint --strength 1.0 0.75
reference sd15-inpainting sd1.5-inpainting --mode inpaint --strength 1.0
reference sdxl-img2img sdxl --mode img2img --strength 0.5 0.75
reference sdxl-inpainting sdxl-inpainting --mode inpaint --strength 1.0
rm -rf "$models"
