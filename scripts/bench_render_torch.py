#!/usr/bin/env python3
"""Renders one image with diffusers on the CPU from a Drover demo model folder (or any SD1.x
diffusers folder) and prints one JSON line with the load and render times, to set beside
`drover-node render` on the same folder in the same run (BENCHMARKS.md, "Samplers").

  python3 scripts/bench_render_torch.py --model DIR [--sampler dpmpp_2m_karras|euler_a|euler|ddim]
      [--steps 20] [--guidance 7] [--size 512] [--threads N]
      [--init-image PNG [--strength S] [--mask PNG]]   (img2img / inpainting pipelines)

Needs torch, diffusers, transformers from PyPI. Nothing is downloaded.
"""

import argparse
import json
import time

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from transformers import CLIPTokenizer

SAMPLERS = {
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--sampler", default="dpmpp_2m_karras", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--init-image")
    p.add_argument("--mask")
    p.add_argument("--strength", type=float)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    # Drover's demo tokenizer folder has no tokenizer_config.json: CLIP's 77-token limit is given.
    tokenizer = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer", model_max_length=77)
    pipe = StableDiffusionPipeline.from_pretrained(
        a.model, tokenizer=tokenizer, torch_dtype=torch.float32, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    # The img2img and inpaint pipelines over the same components (a demo folder's model_index has
    # no `_diffusers_version`, which their from_pretrained reads).
    if a.mask:
        pipe = StableDiffusionInpaintPipeline(**pipe.components)
    elif a.init_image:
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
    cls, extra = SAMPLERS[a.sampler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    load_ms = (time.perf_counter() - started) * 1000
    extra = {}
    if a.init_image:
        extra["image"] = Image.open(a.init_image).convert("RGB")
        extra["strength"] = a.strength if a.strength is not None else (1.0 if a.mask else 0.75)
    if a.mask:
        extra["mask_image"] = Image.open(a.mask).convert("L")
    if a.init_image and not a.mask:
        sizes = {}  # img2img takes the image's size
    else:
        sizes = dict(height=a.size, width=a.size)
    started = time.perf_counter()
    pipe("a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=a.steps,
         guidance_scale=a.guidance, generator=torch.Generator().manual_seed(1),
         output_type="np", **sizes, **extra)
    render_ms = (time.perf_counter() - started) * 1000
    print(json.dumps({"model": a.model, "sampler": a.sampler, "steps": a.steps, "size": a.size,
                      "guidance": a.guidance, "threads": torch.get_num_threads(),
                      "mode": "inpaint" if a.mask else "img2img" if a.init_image else "txt2img",
                      "strength": extra.get("strength"),
                      "load_ms": load_ms, "render_ms": render_ms}))


if __name__ == "__main__":
    main()
