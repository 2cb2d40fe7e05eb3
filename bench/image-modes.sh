#!/usr/bin/env bash
# What each way of starting an image costs on one device: text, image-to-image, masked
# image-to-image (inpainting on an ordinary checkpoint), an inpainting checkpoint, and the
# hires fix, for SD 1.5 at 512² (25 DDIM steps) and SDXL at 1024² (20 Euler steps), full-size
# random weights; then a textual-inversion embedding and a source image through
# `sparkle generate`.
#
#   SPARKLE=target/release/sparkle bash bench/image-modes.sh
set -uo pipefail
S=${SPARKLE:-target/release/sparkle}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
quiet() { grep -v -- "---:" | grep -v "^UNet\|at most"; }
bench() { timeout 120 "$S" bench engine "$@" 2>/dev/null | quiet; }

"$S" model tiny --arch sd1.5 --full-size "$work/sd15" >/dev/null 2>&1
for mode in text img2img inpaint hires; do
  bench --model "$work/sd15" --batch 1,8 --steps 25 --scheduler ddim --mode "$mode" --strength 0.5
done
"$S" model tiny --arch sd1.5-inpainting --full-size "$work/sd15i" >/dev/null 2>&1
bench --model "$work/sd15i" --batch 1,8 --steps 25 --scheduler ddim --mode inpaint --strength 1.0
rm -rf "$work/sd15i"

# A textual-inversion embedding beside the model, named in the prompt, changes the image.
PY=python3; [ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
mkdir -p "$work/embeddings"
$PY -c "import torch; from safetensors.torch import save_file; save_file({'emb_params': torch.randn(2, 768)}, '$work/embeddings/glowstyle.safetensors')"
for prompt in "a lighthouse" "a lighthouse, glowstyle"; do
  timeout 60 "$S" generate "$prompt" --model "$work/sd15" --seed 3 --steps 25 \
    -o "$work/$(echo "$prompt" | tr -dc a-z).png" 2>&1 | tail -1
done
cmp -s "$work/alighthouse.png" "$work/alighthouseglowstyle.png" \
  && echo "the embedding changed nothing" || echo "the embedding changed the image"
timeout 60 "$S" generate "a lighthouse" --model "$work/sd15" --seed 3 --steps 25 \
  --image "$work/alighthouse.png" --strength 0.5 -o "$work/i2i.png" 2>&1 | tail -1
rm -rf "$work/sd15"

"$S" model tiny --arch sdxl --full-size "$work/sdxl" >/dev/null 2>&1
for mode in text img2img; do
  bench --model "$work/sdxl" --batch 1,4 --steps 20 --scheduler euler --size 1024x1024 \
    --mode "$mode" --strength 0.5
done
bench --model "$work/sdxl" --batch 1 --steps 20 --scheduler euler --size 768x768 --mode hires \
  --hires-scale 1.5 --strength 0.5
