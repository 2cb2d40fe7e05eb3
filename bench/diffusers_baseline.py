"""The diffusers baseline for `sparkle bench engine`: the same model directory, the same
request shape, the same table.

    python bench/diffusers_baseline.py --model DIR [--batch 1,4,8,16] [--steps 25]
        [--size 512x512] [--guidance 7.5] [--dtype fp16|bf16] [--scheduler ddim|euler]
        [--repeat 3] [--compile]

MODEL_DIR is a diffusers-layout model, e.g. one written by `sparkle model tiny DIR --full-size`
(full-size random weights), so both engines run the same weights; SD 1.x/2.x and SDXL (the
pipeline class comes from the model's model_index.json). Each batch runs the whole
pipeline (text encoding, `steps` DDIM or Euler steps with classifier-free guidance, VAE decode, copy to
the host) `repeat` times after one warm-up run; the median is reported. UNet milliseconds per
step are timed separately with CUDA events around one UNet call on the same batch (2×batch
rows with guidance). TFLOP/s is the UNet's FLOPs (torch's FlopCounterMode) over that UNet time,
the accounting `sparkle bench engine` uses. Peak memory is what torch's allocator reserved
(the CUDA context, ~0.5 GiB, is not in it; `sparkle bench engine` reports the device's used
memory, context included).
"""
import argparse
import json
import statistics
import time

import diffusers
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler
from torch.utils.flop_counter import FlopCounterMode


def parse_size(text):
    w, _, h = text.partition("x")
    return int(w), int(h)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", default="1,4,8,16")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--scheduler", choices=["ddim", "euler"], default="ddim",
                    help="the sampler, as `sparkle bench engine --scheduler` names it")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (reduce-overhead: CUDA graphs)")
    ap.add_argument("--recipe", action="store_true",
                    help="with --compile, diffusers' speed recipe too: UNet and VAE channels_last, fused QKV "
                         "projections, 1x1 convolutions as matrix products, no epilogue fusion")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    width, height = parse_size(args.size)
    batches = [int(b) for b in args.batch.split(",")]
    cfg = args.guidance > 1.0

    start = time.perf_counter()
    with open(f"{args.model}/model_index.json") as f:
        xl = "XL" in json.load(f)["_class_name"]
    extra = {} if xl else dict(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, **extra)
    scheduler = DDIMScheduler if args.scheduler == "ddim" else EulerDiscreteScheduler
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    if args.compile:
        if args.recipe:
            import torch._inductor.config as inductor
            inductor.conv_1x1_as_mm = True
            inductor.epilogue_fusion = False
            pipe.fuse_qkv_projections()
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)

    latent = (pipe.unet.config.in_channels, height // 8, width // 8)
    context = pipe.unet.config.cross_attention_dim

    def unet_inputs(rows):
        """Noise, time steps, text and (SDXL) pooled-text and size conditioning for `rows`."""
        x = torch.randn(rows, *latent, device="cuda", dtype=dtype)
        t = torch.tensor([500] * rows, device="cuda")
        extra = dict(encoder_hidden_states=torch.randn(rows, 77, context, device="cuda", dtype=dtype))
        if xl:
            pooled = pipe.text_encoder_2.config.projection_dim
            extra["added_cond_kwargs"] = dict(
                text_embeds=torch.randn(rows, pooled, device="cuda", dtype=dtype),
                time_ids=torch.tensor([[height, width, 0, 0, height, width]] * rows, device="cuda", dtype=dtype),
            )
        return x, t, extra
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
        x, t, extra = unet_inputs(1)
        unet(x, t, **extra)
    unet_flops = counter.get_total_flops()

    first = None
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}"
          f"{', UNet compiled' if args.compile else ''}{' with the recipe' if args.recipe else ''}; load {load_s:.1f} s; UNet {unet_flops / 1e12:.3f} TFLOP/sample")
    print(f"{'batch':>5} {'images/s':>9} {'s/batch':>8} {'ms/UNet step':>13} {'TFLOP/s':>8} {'peak GiB':>9}")
    rows = []
    for batch in batches:
        torch.cuda.reset_peak_memory_stats()
        prompts = [f"a corgi, style of monet, {i}" for i in range(batch)]

        def run():
            gen = [torch.Generator("cuda").manual_seed(7 + i) for i in range(batch)]
            t0 = time.perf_counter()
            images = pipe(prompts, negative_prompt=["blurry"] * batch if cfg else None, width=width, height=height,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gen,
                          output_type="np").images
            torch.cuda.synchronize()
            assert images.shape[0] == batch
            return time.perf_counter() - t0

        warm = run()
        if first is None:
            first = warm
        times = [run() for _ in range(args.repeat)]
        seconds = statistics.median(times)

        rows_in = batch * (2 if cfg else 1)
        x, t, extra = unet_inputs(rows_in)
        with torch.no_grad():
            for _ in range(3):
                pipe.unet(x, t, **extra)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
            for s, e in zip(starts, ends):
                s.record()
                pipe.unet(x, t, **extra)
                e.record()
            torch.cuda.synchronize()
        unet_ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

        tflops = unet_flops * rows_in / (unet_ms / 1e3) / 1e12
        peak = torch.cuda.max_memory_reserved() / 2**30
        row = dict(batch=batch, images_per_s=batch / seconds, s_per_batch=seconds, unet_ms=unet_ms,
                   tflops=tflops, peak_gib=peak)
        rows.append(row)
        print(f"{batch:>5} {row['images_per_s']:>9.2f} {seconds:>8.3f} {unet_ms:>13.1f} {tflops:>8.1f} {peak:>9.2f}")
    print(f"first call (warm-up included): {first:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(load_s=load_s, first_s=first, unet_tflop=unet_flops / 1e12, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
