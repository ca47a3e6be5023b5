#!/usr/bin/env python3
"""Builds the img2img and inpainting parity fixtures: diffusers' own pipelines
(StableDiffusionImg2ImgPipeline, LatentConsistencyModelImg2ImgPipeline, StableDiffusionInpaintPipeline,
StableDiffusionXLImg2ImgPipeline; the inpaint pipeline also with a 9-channel inpainting UNet) run end to end on the committed tiny models, and what they made is
recorded.

Reads (made by `scripts/make_fixtures.py`):
  node/tests/fixtures/tiny-sd15-lcm/   tokenizer, text encoder, VAE (and the LCM UNet)
  node/tests/fixtures/tiny-unet/       a standard SD1-style UNet, paired with tiny-sd15-lcm's other parts
  node/tests/fixtures/tiny-sdxl-lcm/   the SDXL-shaped LCM model

Writes:
  node/tests/fixtures/tiny-unet-inpaint/    a 9-channel inpainting UNet (tiny-unet's shape, f16)
  node/tests/fixtures/img2img.json         one entry per case: pipeline, model, sampler, steps,
                                           strength, guidance, prompt, whether it has a mask, and how
                                           many noise draws its scheduler made
  node/tests/fixtures/img2img.safetensors  the source image and mask (16×16, 0..255), the VAE
                                           encoder's latent mean per model, and per case the initial
                                           noise, every scheduler noise draw, the final latent and
                                           the decoded image in [-1, 1]

Two things are pinned so that Drover can replay them exactly:
  - the VAE posterior: Drover encodes to the latent distribution's mean (its spread is negligible on
    SD VAEs), so `retrieve_latents` is patched to take the mean (diffusers' `sample_mode="argmax"`);
  - the noise: `randn_tensor` in the pipeline and scheduler modules is wrapped to record each draw.

Run from the repository root: `python3 scripts/make_img2img_fixtures.py` (torch, diffusers,
transformers, safetensors from PyPI). Nothing is downloaded.
"""

import json
import os

import torch
from PIL import Image
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LatentConsistencyModelImg2ImgPipeline,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_img2img as lcm_img2img
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as sd_img2img
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as sd_inpaint
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as sdxl_img2img
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "node", "tests", "fixtures")
SD = os.path.join(ROOT, "tiny-sd15-lcm")
SDXL = os.path.join(ROOT, "tiny-sdxl-lcm")
torch.set_grad_enabled(False)

# Stable Diffusion 1.5's scheduler settings (as in make_sampler_fixtures.py).
BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    set_alpha_to_one=False,
    clip_sample=False,
)

SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}

PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry"

# (name, pipeline, model, sampler, steps, strength, guidance)
CASES = [
    ("img2img_dpmpp_2m_karras", "img2img", "sd15", "dpmpp_2m_karras", 10, 0.6, 7.0),
    ("img2img_euler_a", "img2img", "sd15", "euler_a", 8, 0.75, 7.0),
    ("img2img_heun", "img2img", "sd15", "heun", 5, 0.5, 7.0),
    ("img2img_ddim", "img2img", "sd15", "ddim", 8, 0.7, 7.0),
    ("img2img_unipc", "img2img", "sd15", "unipc", 8, 0.55, 5.0),
    ("img2img_lcm", "lcm_img2img", "sd15_lcm", "lcm", 4, 0.5, 8.0),
    ("inpaint_euler_full", "inpaint", "sd15", "euler", 6, 1.0, 7.0),
    ("inpaint_dpmpp_2m", "inpaint", "sd15", "dpmpp_2m", 8, 0.8, 7.0),
    ("inpaint_heun", "inpaint", "sd15", "heun", 4, 0.75, 7.0),
    ("inpaint_lcm_full", "inpaint", "sd15_lcm", "lcm", 4, 1.0, 8.0),
    ("sdxl_img2img_lcm_full", "sdxl_img2img", "sdxl_lcm", "lcm", 4, 1.0, 8.0),
    ("inpaint9_euler_full", "inpaint", "sd15_inpaint", "euler", 6, 1.0, 7.0),
    ("inpaint9_dpmpp_2m", "inpaint", "sd15_inpaint", "dpmpp_2m", 8, 0.75, 7.0),
]


def make_inpaint_unet():
    """A 9-channel inpainting UNet (latents + mask + masked-image latents in), tiny-unet's shape
    otherwise, weights rounded to f16 and stored so; written to tiny-unet-inpaint/."""
    with open(os.path.join(ROOT, "tiny-unet", "config.json")) as f:
        config = json.load(f)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["in_channels"] = 9
    torch.manual_seed(19)
    unet = UNet2DConditionModel.from_config(config).eval()
    for p in unet.parameters():
        p.data = p.data.to(torch.float16).to(torch.float32)
    folder = os.path.join(ROOT, "tiny-unet-inpaint")
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    saved = dict(unet.config)
    saved.pop("_use_default_values", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(saved, f, indent=1, sort_keys=True)
    return unet


class Recorder:
    """Stands in for diffusers' `randn_tensor` and keeps every draw, per role."""

    def __init__(self, role, draws):
        self.role = role
        self.draws = draws
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = torch.randn(tuple(shape), generator=self.gen, dtype=torch.float32)
        self.draws.append((self.role, noise.clone()))
        return noise.to(dtype or torch.float32)


def retrieve_mean(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


def source_image(gen):
    """A 16×16 image with structure (gradients and a square) plus noise, as uint8."""
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    r = 40 + 12 * x
    g = 200 - 9 * y
    b = 90 + 60 * ((x > 4) & (x < 11) & (y > 3) & (y < 12)).float()
    img = torch.stack([r, g, b], dim=-1) + torch.randint(-20, 21, (16, 16, 3), generator=gen)
    return img.clamp(0, 255).to(torch.uint8)


def mask_image():
    """White (repaint) over columns 4..12 of rows 6..16, black elsewhere, as uint8 luma."""
    m = torch.zeros(16, 16, dtype=torch.uint8)
    m[6:16, 4:12] = 255
    return m


def sd_parts():
    tok = CLIPTokenizer.from_pretrained(os.path.join(SD, "tokenizer"))
    tok.model_max_length = 77  # the tiny tokenizer's config leaves it unset
    te = CLIPTextModel.from_pretrained(os.path.join(SD, "text_encoder"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(SD, "vae"), torch_dtype=torch.float32).eval()
    return tok, te, vae


def main():
    draws = []
    init_noise, step_noise = Recorder("init", draws), Recorder("step", draws)
    for module in (sd_img2img, sd_inpaint, lcm_img2img, sdxl_img2img):
        module.retrieve_latents = retrieve_mean
        module.randn_tensor = init_noise
    for module in (scheduling_euler_ancestral_discrete, scheduling_lcm):
        module.randn_tensor = step_noise

    gen = torch.Generator().manual_seed(47)
    tensors = {}
    img = source_image(gen)
    mask = mask_image()
    tensors["source.rgb"] = img.float()
    tensors["source.mask"] = mask.float()
    pil_img = Image.fromarray(img.numpy(), "RGB")
    pil_mask = Image.fromarray(mask.numpy(), "L")

    tok, te, vae = sd_parts()
    unet_std = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "tiny-unet"), torch_dtype=torch.float32).eval()
    unet_lcm = UNet2DConditionModel.from_pretrained(os.path.join(SD, "unet"), torch_dtype=torch.float32).eval()
    unet_inpaint = make_inpaint_unet()
    sdxl_vae = AutoencoderKL.from_pretrained(os.path.join(SDXL, "vae"), torch_dtype=torch.float32).eval()

    # The encoder alone: the latent mean of the source image in [-1, 1].
    pixels = (img.permute(2, 0, 1)[None].float() / 255.0) * 2 - 1
    tensors["encode.sd15"] = vae.encode(pixels).latent_dist.mean
    tensors["encode.sdxl"] = sdxl_vae.encode(pixels).latent_dist.mean

    lcm_config = LCMScheduler.load_config(os.path.join(SD, "scheduler"))
    cases = []
    for index, (name, kind, model, sampler, steps, strength, guidance) in enumerate(CASES):
        if sampler == "lcm":
            sched = LCMScheduler.from_config(lcm_config)
        else:
            cls, extra = SCHEDULERS[sampler]
            sched = cls.from_config(dict(BASE, **extra))
        common = dict(vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched)
        unet = {"sd15_lcm": unet_lcm, "sd15_inpaint": unet_inpaint}.get(model, unet_std)
        if kind == "img2img":
            pipe = StableDiffusionImg2ImgPipeline(unet=unet, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False, **common)
        elif kind == "lcm_img2img":
            pipe = LatentConsistencyModelImg2ImgPipeline(unet=unet, safety_checker=None, feature_extractor=None,
                                                         requires_safety_checker=False, **common)
        elif kind == "inpaint":
            pipe = StableDiffusionInpaintPipeline(unet=unet, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False, **common)
        else:
            pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(SDXL, torch_dtype=torch.float32)
            pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
            pipe.tokenizer.model_max_length = pipe.tokenizer_2.model_max_length = 77
        pipe.set_progress_bar_config(disable=True)
        draws.clear()
        init_noise.gen = torch.Generator().manual_seed(500 + index)
        step_noise.gen = torch.Generator().manual_seed(1500 + index)
        args = dict(prompt=PROMPT, image=pil_img, num_inference_steps=steps, strength=strength,
                    guidance_scale=guidance, output_type="latent")
        if sampler != "lcm":
            args["negative_prompt"] = NEGATIVE
        if kind == "inpaint":
            args.update(mask_image=pil_mask, height=16, width=16)
        latent = pipe(**args).images
        used_vae = sdxl_vae if kind == "sdxl_img2img" else vae
        image = used_vae.decode(latent / used_vae.config.scaling_factor).sample
        init = [d for role, d in draws if role == "init"]
        step = [d for role, d in draws if role == "step"]
        assert len(init) == 1, (name, len(init))
        tensors[f"{name}.init_noise"] = init[0]
        for k, d in enumerate(step):
            tensors[f"{name}.noise.{k}"] = d
        tensors[f"{name}.latent"] = latent
        tensors[f"{name}.image"] = image
        cases.append(dict(name=name, pipeline=kind, model=model, sampler=sampler, steps=steps,
                          strength=strength, guidance=guidance, prompt=PROMPT,
                          negative_prompt=args.get("negative_prompt") or "",
                          mask=kind == "inpaint", noise_draws=len(step)))
        print(f"{name}: |latent| max {latent.abs().max():.3f}, {len(step)} step draws")

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(ROOT, "img2img.safetensors"))
    with open(os.path.join(ROOT, "img2img.json"), "w") as f:
        json.dump(dict(cases=cases), f, indent=1)


if __name__ == "__main__":
    main()
