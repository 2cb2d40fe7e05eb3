"""Reads a single-file checkpoint written by the engine with diffusers' own conversion, and
compares every network with the diffusers-layout model it was written from.

    sparkle model tiny MODEL_DIR --arch sd1.5
    sparkle model tiny CHECKPOINT.safetensors --arch sd1.5 --single-file
    python single_file_check.py MODEL_DIR CHECKPOINT.safetensors

Both commands write the same random weights for the same seed and architecture. CHECKPOINT is
loaded with `StableDiffusionPipeline.from_single_file(CHECKPOINT, config=MODEL_DIR,
local_files_only=True)` (the XL pipeline for a model with a second text encoder): diffusers
converts the original layout's names, fused OpenCLIP attention and 1x1 attention kernels
itself, taking only the configuration from MODEL_DIR. Each network's state dict must then
hold the same tensors, under the same names, as the same network loaded from MODEL_DIR; the
largest absolute difference per network is printed. Exits non-zero on any difference in
names or shapes, a tensor diffusers left unloaded, or values further apart than --tolerance.

diffusers tells SDXL's two text encoders apart by their widths (768 and 1280). The small
models' are equally wide, so for them the second encoder is converted with diffusers'
`convert_open_clip_checkpoint` directly rather than through the pipeline.

Last run (diffusers 0.42.1, transformers 5.23.0, torch 2.15.0, CPU, float32): sd1.5, sd2.1
and sdxl each loaded with every tensor identical (max |difference| 0).
"""
import argparse
import json
import sys
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection


def compare(name, ours, theirs):
    """Largest absolute difference between two state dicts; None if names or shapes differ."""
    ours, theirs = ours.state_dict(), theirs.state_dict()
    if ours.keys() != theirs.keys():
        print(f"{name}: only from the single file: {sorted(ours.keys() - theirs.keys())[:5]}")
        print(f"{name}: only from the directory: {sorted(theirs.keys() - ours.keys())[:5]}")
        return None
    unloaded = [key for key, tensor in ours.items() if tensor.is_meta]
    if unloaded:
        print(f"{name}: diffusers left {len(unloaded)} tensors unloaded: {unloaded[:5]}")
        return None
    worst = 0.0
    for key, tensor in theirs.items():
        other = ours[key]
        if other.shape != tensor.shape:
            print(f"{name}: {key} is {tuple(other.shape)}, not {tuple(tensor.shape)}")
            return None
        if tensor.is_floating_point():
            worst = max(worst, (other.double() - tensor.double()).abs().max().item())
    print(f"{name}: {len(theirs)} tensors, max |difference| {worst:.3g}")
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args()
    print(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}")

    xl = (args.model_dir / "text_encoder_2").is_dir()
    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    loaded = pipeline.from_single_file(
        str(args.checkpoint),
        config=str(args.model_dir),
        local_files_only=True,
        torch_dtype=torch.float32,
        **extra,
    )
    parts = [
        ("unet", loaded.unet, UNet2DConditionModel.from_pretrained(args.model_dir / "unet")),
        ("vae", loaded.vae, AutoencoderKL.from_pretrained(args.model_dir / "vae")),
        ("text_encoder", loaded.text_encoder,
         CLIPTextModel.from_pretrained(args.model_dir / "text_encoder")),
    ]
    if xl:
        second = CLIPTextModelWithProjection.from_pretrained(args.model_dir / "text_encoder_2")
        ours = loaded.text_encoder_2
        if second.config.hidden_size == loaded.text_encoder.config.hidden_size:
            # diffusers tells SDXL's two encoders apart by width; in a small model of equal
            # widths it takes the first for the second, so convert the second directly.
            print("text_encoder_2: both encoders are as wide; converted with "
                  "convert_open_clip_checkpoint directly")
            checkpoint = load_file(str(args.checkpoint))
            converted = convert_open_clip_checkpoint(
                second, checkpoint, prefix="conditioner.embedders.1.model.")
            ours = CLIPTextModelWithProjection(second.config)
            ours.load_state_dict(converted, strict=True)
        parts.append(("text_encoder_2", ours, second))
    results = {name: compare(name, ours, theirs) for name, ours, theirs in parts}
    print(json.dumps(results))
    failed = [name for name, worst in results.items() if worst is None or worst > args.tolerance]
    if failed:
        print(f"differ: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
