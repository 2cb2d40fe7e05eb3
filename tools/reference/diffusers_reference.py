"""Reference outputs from diffusers for the engine's parity tests.

    python diffusers_reference.py MODEL_DIR OUT_DIR [--steps N] [--guidance G]
        [--schedulers NAME ...] [--lora kohya|peft [--lora-weight W]] [--embedding NAME]

MODEL_DIR is a diffusers-layout model written by `sparkle model tiny MODEL_DIR` (the weights
are deterministic, so the Rust tests regenerate the same model instead of committing it).
For each scheduler this runs diffusers' own components on the CPU in float32 from fixed
initial noise and writes OUT_DIR/<scheduler>.safetensors with:

  initial   the initial latents (before scaling by the scheduler's init sigma)
  uncond    text embeddings of the negative prompt  [1, 77, hidden]
  cond      text embeddings of the prompt           [1, 77, hidden]
  uncond_pooled, cond_pooled
            (SDXL) the pooled, projected features of text_encoder_2  [1, projection]
  timesteps the timesteps the UNet saw
  first     latents after the first step
  last      latents after the last step
  image     the decoded image, in [0, 1], [1, 3, H, W]
  noise     (Euler a only) the fresh noise drawn at each step, [steps, 4, h, w]

and OUT_DIR/case.json with the prompt, sizes and versions.

With --lora, the script first writes a LoRA for the model's architecture into
OUT_DIR/loras/style.safetensors — deterministic factors of rank 4 on every linear layer of the
UNet's transformers, their 1×1 in/out projections, one ResNet convolution (LoCon) and every
linear layer of the text encoder — in the kohya-ss layout (`lora_unet_…`/`lora_te_…`, with
`alpha`) or diffusers' PEFT layout (`unet.….lora_A.weight`), loads it with diffusers' own
`load_lora_weights` at --lora-weight, and checks that every factor was taken. With
--embedding NAME it writes an A1111 embedding (`emb_params`, two vectors) to
OUT_DIR/embeddings/NAME.safetensors, loads it with diffusers' `load_textual_inversion`, and
uses NAME in the prompt. SD 1.x models only (one text encoder). Any weight diffusers or
transformers would have to invent (a missing or unexpected tensor) is an error. A model with
a text_encoder_2 is SDXL: its text conditioning comes from diffusers' own
StableDiffusionXLPipeline.encode_prompt and its size ids from the pipeline as well.
"""
import argparse
import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CASE = {
    "prompt": "a corgi, style of monet",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 48,
    "steps": 4,
    "guidance_scale": 7.5,
    "noise_seed": 1234,
}

SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
}


def load_strict(cls, path, **kwargs):
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"{path}: weights do not match the architecture: {bad}")
    return model.eval()


LORA_RANK = 4


def lora_layers(unet, text_encoder):
    """The layers the test LoRA changes: (network prefix, module name, module)."""
    layers = []
    for name, module in unet.named_modules():
        linear = isinstance(module, torch.nn.Linear) and ".transformer_blocks." in name
        projection = name.endswith(("proj_in", "proj_out")) and ".attentions." in name
        locon = name == "down_blocks.0.resnets.0.conv1"
        if linear or projection or locon:
            layers.append(("unet", name, module))
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            layers.append(("text_encoder", name, module))
    return layers


def write_lora(path, layout, unet, text_encoder):
    """Deterministic factors for every layer of `lora_layers`, in kohya-ss's or PEFT's layout;
    the number of factor pairs per network."""
    generator = torch.Generator().manual_seed(7)
    tensors, pairs = {}, {"unet": 0, "text_encoder": 0}
    for network, name, module in lora_layers(unet, text_encoder):
        weight = module.weight
        down_shape = (LORA_RANK, *weight.shape[1:])
        up_shape = (weight.shape[0], LORA_RANK, *([1] * (weight.dim() - 2)))
        down = torch.randn(down_shape, generator=generator) / (weight[0].numel() ** 0.5)
        up = torch.randn(up_shape, generator=generator) * 0.5
        if layout == "kohya":
            prefix = "lora_unet_" if network == "unet" else "lora_te_"
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(LORA_RANK) / 2)
        else:
            tensors[f"{network}.{name}.lora_A.weight"] = down
            tensors[f"{network}.{name}.lora_B.weight"] = up
        pairs[network] += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return pairs


def main(model_dir: str, out_dir: str, steps: int, guidance: float, schedulers, lora, lora_weight, embedding) -> None:
    CASE["steps"], CASE["guidance_scale"] = steps, guidance
    model, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = load_strict(CLIPTextModel, model / "text_encoder")
    unet = load_strict(UNet2DConditionModel, model / "unet")
    vae = load_strict(AutoencoderKL, model / "vae")
    base_config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    convert = lambda text: text
    if lora or embedding:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(base_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if lora:
        path = out / "loras" / "style.safetensors"
        pairs = write_lora(path, lora, unet, text_encoder)
        pipe.load_lora_weights(str(path), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[lora_weight])
        from peft.utils import get_peft_model_state_dict
        for network, module in (("unet", unet), ("text_encoder", text_encoder)):
            taken = len(get_peft_model_state_dict(module, adapter_name="style")) // 2
            if taken != pairs[network]:
                raise SystemExit(f"{network}: diffusers took {taken} of {pairs[network]} LoRA layers")
        CASE["lora"] = {"name": "style", "weight": lora_weight, "layout": lora, "layers": pairs}
    if embedding:
        vectors = torch.randn((2, text_encoder.config.hidden_size), generator=torch.Generator().manual_seed(11))
        path = out / "embeddings" / f"{embedding}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"emb_params": vectors.contiguous()}, path)
        pipe.load_textual_inversion(str(path), token=embedding)
        CASE["prompt"] = f"a corgi in {embedding} style, by monet"
        CASE["embedding"] = embedding
        convert = lambda text: pipe.maybe_convert_prompt(text, tokenizer)

    g = CASE["guidance_scale"]
    pooled = {}
    added = lambda rows: {}
    if (model / "text_encoder_2").is_dir():
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=load_strict(CLIPTextModelWithProjection, model / "text_encoder_2"),
            tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(model / "tokenizer_2"),
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(json.loads((model / "scheduler" / "scheduler_config.json").read_text())),
        )
        cond, uncond, cond_pooled, uncond_pooled = pipe.encode_prompt(
            CASE["prompt"],
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=CASE["negative_prompt"],
        )
        pooled = {"uncond_pooled": uncond_pooled, "cond_pooled": cond_pooled}
        size = (CASE["height"], CASE["width"])
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )

        def added(rows):
            text = torch.cat([uncond_pooled, cond_pooled]) if rows == 2 else cond_pooled
            return {"added_cond_kwargs": {"text_embeds": text, "time_ids": time_ids.repeat(rows, 1)}}
    else:
        def embed(text):
            ids = tokenizer(convert(text), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return text_encoder(ids)[0]

        uncond, cond = embed(CASE["negative_prompt"]), embed(CASE["prompt"])
    shape = (1, unet.config.in_channels, CASE["height"] // 8, CASE["width"] // 8)
    initial = torch.randn(shape, generator=torch.Generator().manual_seed(CASE["noise_seed"]))

    for name, (cls, extra) in SCHEDULERS.items():
        if schedulers and name not in schedulers:
            continue
        scheduler = cls.from_config(base_config, **extra)
        scheduler.set_timesteps(CASE["steps"])
        drawn = []
        original = euler_a_module.randn_tensor

        def recording(*args, **kwargs):
            noise = original(*args, **kwargs)
            drawn.append(noise.clone())
            return noise

        euler_a_module.randn_tensor = recording
        try:
            latents = initial * scheduler.init_noise_sigma
            first = None
            generator = torch.Generator().manual_seed(99)
            for i, t in enumerate(scheduler.timesteps):
                # Classifier-free guidance only above 1, as diffusers' pipelines decide.
                if g > 1:
                    model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                    output = unet(model_input, t, encoder_hidden_states=torch.cat([uncond, cond]), **added(2)).sample
                    u, c = output.chunk(2)
                    prediction = u + g * (c - u)
                else:
                    model_input = scheduler.scale_model_input(latents, t)
                    prediction = unet(model_input, t, encoder_hidden_states=cond, **added(1)).sample
                latents = scheduler.step(prediction, t, latents, generator=generator).prev_sample
                if i == 0:
                    first = latents.clone()
        finally:
            euler_a_module.randn_tensor = original
        image = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        tensors = {
            "initial": initial,
            "uncond": uncond,
            "cond": cond,
            "timesteps": scheduler.timesteps.to(torch.float32),
            "first": first,
            "last": latents,
            "image": image,
            **pooled,
        }
        if drawn:
            tensors["noise"] = torch.cat(drawn)
        save_file({k: v.contiguous().to(torch.float32) for k, v in tensors.items()}, out / f"{name}.safetensors")
        print(f"{name}: {len(scheduler.timesteps)} steps, last latent mean {latents.mean().item():+.5f}")

    meta = dict(CASE, diffusers=diffusers.__version__, transformers=transformers.__version__, torch=torch.__version__)
    (out / "case.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=CASE["steps"])
    parser.add_argument("--guidance", type=float, default=CASE["guidance_scale"])
    parser.add_argument("--schedulers", nargs="*", choices=list(SCHEDULERS), default=[])
    parser.add_argument("--lora", choices=["kohya", "peft"])
    parser.add_argument("--lora-weight", type=float, default=0.8)
    parser.add_argument("--embedding")
    args = parser.parse_args()
    main(args.model_dir, args.out_dir, args.steps, args.guidance, args.schedulers, args.lora,
         args.lora_weight, args.embedding)
