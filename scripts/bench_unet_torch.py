#!/usr/bin/env python3
"""Times one UNet forward in PyTorch/diffusers: the baseline for `drover-node bench-unet`.

Same shapes as the Rust tool (`--shape sd15|sd15-lcm|sd2|sdxl|demo|CONFIG.json`), random weights,
batch 1, 77 text tokens, timestep 759; prints one JSON line like the Rust tool.
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

SD15 = dict(
    in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
DEMO = dict(
    in_channels=4, out_channels=4, block_out_channels=[32, 64, 128, 128], layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=256,
)


def config(shape):
    if shape == "sd15":
        return dict(SD15)
    if shape == "sd15-lcm":
        return dict(SD15, time_cond_proj_dim=256)
    if shape == "sd2":
        return dict(SD15, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    if shape == "demo":
        return dict(DEMO)
    if shape == "sdxl":
        return dict(SD15, block_out_channels=[320, 640, 1280],
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    cross_attention_dim=2048, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816)
    with open(shape) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="demo")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    dtype = torch.float16 if a.dtype == "f16" else torch.float32
    cfg = config(a.shape)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval().to(a.device, dtype)
    latent = a.size // 8
    sample = torch.randn(1, cfg.get("in_channels", 4), latent, latent, device=a.device, dtype=dtype)
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"], device=a.device, dtype=dtype)
    cond = None
    if cfg.get("time_cond_proj_dim"):
        cond = torch.randn(1, cfg["time_cond_proj_dim"], device=a.device, dtype=dtype)
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        width = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        side = float(a.size)
        added = {"text_embeds": torch.randn(1, width, device=a.device, dtype=dtype),
                 "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]], device=a.device, dtype=dtype)}
    times = []
    for i in range(a.warmup + a.runs):
        if a.device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        unet(sample, 759, encoder_hidden_states=ctx, timestep_cond=cond, added_cond_kwargs=added)
        if a.device != "cpu":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"shape": a.shape, "size": a.size, "device": f"torch-{a.device}-{a.dtype}",
                      "threads": torch.get_num_threads(), "runs": len(times),
                      "median_ms": statistics.median(times), "mean_ms": statistics.mean(times),
                      "min_ms": min(times), "runs_ms": times}))


if __name__ == "__main__":
    main()
