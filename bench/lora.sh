#!/usr/bin/env bash
# What a LoRA costs on one device: a random LoRA of rank 32 on every linear layer of the
# UNet's transformers (as most LoRAs are trained), merged once into a copy of the weights it
# touches, against the same model without it; and, per UNet call, what the same LoRA would
# add as low-rank side paths instead of being merged. SD 1.5 at 512² (25 DDIM steps) and SDXL
# at 1024² (20 Euler steps), full-size random weights, batch 1 and 8 (SDXL: 1 and 4).
#
#   SPARKLE=target/release/sparkle bash bench/lora.sh
set -uo pipefail
S=${SPARKLE:-target/release/sparkle}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bench() { timeout 240 "$S" bench engine "$@" 2>/dev/null | grep -v -- "---:" | grep -v "^UNet\|at most"; }

"$S" model tiny --arch sd1.5 --full-size "$work/sd15" >/dev/null 2>&1
bench --model "$work/sd15" --batch 1,8 --steps 25 --scheduler ddim
bench --model "$work/sd15" --batch 1,8 --steps 25 --scheduler ddim --lora-rank ${RANK:-32}
rm -rf "$work/sd15"
"$S" model tiny --arch sdxl --full-size "$work/sdxl" >/dev/null 2>&1
bench --model "$work/sdxl" --batch 1,4 --steps 20 --scheduler euler --size 1024x1024 --repeat 1
bench --model "$work/sdxl" --batch 1,4 --steps 20 --scheduler euler --size 1024x1024 --repeat 1 \
  --lora-rank ${RANK:-32}
