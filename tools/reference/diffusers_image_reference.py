"""Reference outputs from diffusers' own image-to-image and inpainting pipelines, for the
engine's parity tests of those modes.

    python diffusers_image_reference.py MODEL_DIR OUT_DIR --mode img2img|inpaint \
        [--strength S ...] [--steps N] [--guidance G]

MODEL_DIR is a diffusers-layout model written by `sparkle model tiny` (any architecture; an
inpainting UNet of 9 input channels is what `sd1.5-inpainting` and `sdxl-inpainting` write).
The pipelines run on the CPU in float32 with two changes that make them comparable with the
engine: the VAE's encoding is the latent distribution's mean (diffusers' `argmax` mode;
the default draws a sample), and every noise the pipeline draws is recorded. For each
scheduler and strength this writes OUT_DIR/<scheduler>-<strength×100>.safetensors with:

  source          the source image, RGB values 0–255, [H, W, 3]
  mask            (inpaint) the mask, 0 or 255, [H, W]: 255 is repainted
  source_latents  the source's latents, scaled, [1, 4, h, w]
  initial         the noise the pipeline drew for the initial latents, [1, 4, h, w]
  noise           (Euler a only) the fresh noise drawn at each step, [steps, 4, h, w]
  first           latents after the first step that ran
  last            latents after the last step
  image           the decoded image, in [0, 1], [1, 3, H, W]

and OUT_DIR/case.json with the prompt, sizes, mode and versions. With a 4-channel UNet,
"inpaint" is diffusers' masked image-to-image (the kept area blended back after every step);
with a 9-channel one, the UNet sees the mask and the masked image's latents.
"""
import argparse
import json
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image
from diffusers import (
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from diffusers_reference import CASE, SCHEDULERS, load_strict  # noqa: E402

# The repainted rectangle: not aligned to the latents' 8-pixel grid, so that the rule that
# brings the mask to the latents' size is exercised.
MASK_BOX = (20, 6, 52, 38)  # x0, y0, x1, y1


def source_image(width, height):
    """A diagonal gradient with a bright square, in three different channels."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x + y) * 2 % 256, x * 4 % 256, y * 4 % 256], axis=-1).astype(np.uint8)
    rgb[20:44, 16:40] = 250
    return rgb


def mask_image(width, height):
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = MASK_BOX
    mask[y0:y1, x0:x1] = 255
    return mask


def mean_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


def main(args) -> None:
    model, out = Path(args.model_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    case = dict(CASE, steps=args.steps, guidance_scale=args.guidance, mode=args.mode,
                strengths=args.strength)
    width, height = case["width"], case["height"]
    parts = dict(
        vae=load_strict(AutoencoderKL, model / "vae"),
        text_encoder=load_strict(CLIPTextModel, model / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer"),
        unet=load_strict(UNet2DConditionModel, model / "unet"),
    )
    xl = (model / "text_encoder_2").is_dir()
    if xl:
        parts["text_encoder_2"] = load_strict(CLIPTextModelWithProjection, model / "text_encoder_2")
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(model / "tokenizer_2")
        cls = StableDiffusionXLInpaintPipeline if args.mode == "inpaint" else StableDiffusionXLImg2ImgPipeline
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        cls = StableDiffusionInpaintPipeline if args.mode == "inpaint" else StableDiffusionImg2ImgPipeline
    module = sys.modules[cls.__module__]
    base_config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    rgb = source_image(width, height)
    mask = mask_image(width, height)
    vae = parts["vae"]
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    source_latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor

    for strength in args.strength:
        for name, (scheduler_cls, extra) in SCHEDULERS.items():
            pipe = cls(scheduler=scheduler_cls.from_config(base_config, **extra), **parts)
            pipe.set_progress_bar_config(disable=True)
            initial, ancestral, steps_seen = [], [], []
            originals = (module.retrieve_latents, module.randn_tensor, euler_a_module.randn_tensor)

            def drawn_by(into, original):
                def draw(*a, **k):
                    noise = original(*a, **k)
                    into.append(noise.clone())
                    return noise
                return draw

            module.retrieve_latents = mean_latents
            module.randn_tensor = drawn_by(initial, originals[1])
            euler_a_module.randn_tensor = drawn_by(ancestral, originals[2])

            def on_step(pipe, i, t, kwargs):
                steps_seen.append(kwargs["latents"].clone())
                return kwargs

            call = dict(
                prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                image=Image.fromarray(rgb), strength=strength,
                num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
                generator=torch.Generator().manual_seed(case["noise_seed"]),
                output_type="latent", callback_on_step_end=on_step,
            )
            if args.mode == "inpaint":
                call.update(mask_image=Image.fromarray(mask), height=height, width=width)
            try:
                latents = pipe(**call).images
            finally:
                module.retrieve_latents, module.randn_tensor, euler_a_module.randn_tensor = originals
            if len(initial) != 1:
                raise SystemExit(f"expected one draw of initial noise, saw {len(initial)}")
            image = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
            tensors = {
                "source": torch.from_numpy(rgb).float(),
                "source_latents": source_latents,
                "initial": initial[0],
                "first": steps_seen[0],
                "last": latents,
                "image": image,
            }
            if args.mode == "inpaint":
                tensors["mask"] = torch.from_numpy(mask).float()
            if ancestral:
                tensors["noise"] = torch.cat(ancestral)
            file = out / f"{name}-{round(strength * 100)}.safetensors"
            save_file({k: v.contiguous().to(torch.float32) for k, v in tensors.items()}, file)
            print(f"{file.name}: {len(steps_seen)} steps, last latent mean {latents.mean().item():+.5f}")

    meta = dict(case, unet_in_channels=parts["unet"].config.in_channels,
                diffusers=diffusers.__version__, transformers=transformers.__version__,
                torch=torch.__version__)
    (out / "case.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--mode", choices=["img2img", "inpaint"], required=True)
    parser.add_argument("--strength", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--steps", type=int, default=CASE["steps"])
    parser.add_argument("--guidance", type=float, default=CASE["guidance_scale"])
    main(parser.parse_args())
