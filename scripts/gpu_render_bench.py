#!/usr/bin/env python3
"""Whole-image figures of the GPU bench (scripts/gpu-bench.sh), the diffusers side, and the model
both sides render from.

  gpu_render_bench.py make DIR
      Writes an SD1.5-LCM model with random weights at the published shapes (UNet 320/640/1280/
      1280 with the LCM guidance embedding, CLIP ViT-L/14 text encoder, the SD VAE) as a
      diffusers folder in f16, with the committed fixture's tokenizer and LCM scheduler.
  gpu_render_bench.py diffusers DIR [--runs N] [--warmup N] [--size 512] [--steps 4]
      Times `LatentConsistencyModelPipeline` (fp16, SDPA) on CUDA: text encoder + 4 UNet steps +
      VAE decode + PNG encoding per image, and prints one JSON line (median ms, peak memory).
  gpu_render_bench.py compare A.png B.png [--max-mean L] [--max-abs L]
      Compares two PNGs of the same size (8-bit levels): prints the mean and max absolute
      difference as JSON; exits 1 when over the limits given.

Needs torch, diffusers, transformers, safetensors, pillow (on the GPU machine; diffusers from
bench-carry/wheels). No weights are downloaded.
"""

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURE = os.path.join(ROOT, "node", "tests", "fixtures", "tiny-sd15-lcm")


def make(out):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(FIXTURE, sub), os.path.join(out, sub), dirs_exist_ok=True)
    shutil.copy(os.path.join(FIXTURE, "model_index.json"), out)
    # The fixture's tokenizer names no length limit; the pipeline pads prompts to CLIP's 77.
    config_path = os.path.join(out, "tokenizer", "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["model_max_length"] = 77
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        time_cond_proj_dim=256,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    # Random init gives huge activations through 12 CLIP layers and 16 UNet resnets in f16;
    # small weights keep the random model inside f16's range, as trained weights are.
    with torch.no_grad():
        for model in (unet, text, vae):
            for name, p in model.named_parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
    unet.half().save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    text.half().save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True)
    vae.half().save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    with open(os.path.join(out, "RANDOM_WEIGHTS.txt"), "w") as f:
        f.write("random weights at SD1.5-LCM shapes, made by scripts/gpu_render_bench.py\n")
    print(json.dumps({"made": out}))


def bench_diffusers(a):
    import torch
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(
        a.model, torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def once():
        g = torch.Generator("cuda").manual_seed(1)
        image = pipe(
            "a lighthouse at dusk",
            num_inference_steps=a.steps,
            guidance_scale=8.0,
            height=a.size,
            width=a.size,
            generator=g,
        ).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf

    for _ in range(a.warmup):
        once()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.runs):
        start = time.perf_counter()
        once()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    print(json.dumps({
        "impl": "diffusers", "torch": torch.__version__, "steps": a.steps, "size": a.size,
        "median_ms": statistics.median(times), "runs_ms": times,
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
    }))


def compare(a):
    from PIL import Image

    x = Image.open(a.first).convert("RGB")
    y = Image.open(a.second).convert("RGB")
    if x.size != y.size:
        print(json.dumps({"error": f"sizes differ: {x.size} vs {y.size}"}))
        sys.exit(1)
    diffs = [abs(p - q) for p, q in zip(x.tobytes(), y.tobytes())]
    mean = sum(diffs) / len(diffs)
    worst = max(diffs)
    ok = mean <= a.max_mean and worst <= a.max_abs
    print(json.dumps({"first": a.first, "second": a.second, "mean_abs_levels": mean,
                      "max_abs_levels": worst, "max_mean": a.max_mean, "max_abs": a.max_abs,
                      "ok": ok}))
    sys.exit(0 if ok else 1)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    d = sub.add_parser("diffusers")
    d.add_argument("model")
    d.add_argument("--runs", type=int, default=5)
    d.add_argument("--warmup", type=int, default=2)
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--steps", type=int, default=4)
    c = sub.add_parser("compare")
    c.add_argument("first")
    c.add_argument("second")
    c.add_argument("--max-mean", type=float, default=255.0)
    c.add_argument("--max-abs", type=float, default=255.0)
    a = p.parse_args()
    if a.cmd == "make":
        make(a.out)
    elif a.cmd == "diffusers":
        bench_diffusers(a)
    else:
        compare(a)


if __name__ == "__main__":
    main()
