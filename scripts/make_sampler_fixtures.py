#!/usr/bin/env python3
"""Builds the sampler parity fixtures: diffusers' schedulers run full denoising loops with
classifier-free guidance on the committed tiny UNets, and the final latents are recorded.

Reads (made by `scripts/make_fixtures.py`, run that first if they are missing):
  node/tests/fixtures/tiny-unet/        a plain SD1-style UNet (epsilon; also run as v-prediction)
  node/tests/fixtures/tiny-sdxl-lcm/unet/   an SDXL-shaped UNet (text_time conditioning), run
                                        without its LCM guidance embedding

Writes:
  node/tests/fixtures/samplers.json         one entry per case: sampler, model, steps, guidance,
                                            guidance rescale, the scheduler config used, and how
                                            many noise draws it recorded
  node/tests/fixtures/samplers.safetensors  the shared inputs (initial noise, contexts) and, per
                                            case, every noise tensor the scheduler drew (in order)
                                            and the final latent

The loop is the one of diffusers' StableDiffusion(XL)Pipeline: latents = noise * init_noise_sigma;
per timestep, [uncond, cond] in one UNet call on `scale_model_input`, guidance, optional
`rescale_noise_cfg`, `scheduler.step`. Ancestral/SDE samplers draw their noise through
`randn_tensor`, which is wrapped here (LCM's noise between steps too) to record each draw, so the
Rust side replays them exactly. DPM++ SDE's Brownian tree (torchsde) is replaced by `PathNoise`,
the exactly sampled Brownian path Drover uses, built from recorded unit draws.

Run from the repository root: `python3 scripts/make_sampler_fixtures.py` (torch, diffusers,
safetensors from PyPI). Nothing is downloaded.
"""

import json
import os

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
)
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "node", "tests", "fixtures")
torch.set_grad_enabled(False)

# The scheduler settings Stable Diffusion 1.5 and SDXL checkpoints ship (their PNDM/Euler
# configs): every sampler is built from these, as `Scheduler.from_config(pipe.scheduler.config)`.
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

CLASSES = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler,
                            dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
    "dpmpp_sde_karras": (DPMSolverSDEScheduler, dict(use_karras_sigmas=True)),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "unipc_karras": (UniPCMultistepScheduler, dict(use_karras_sigmas=True)),
    # LCM on a standard UNet (what an LCM-LoRA makes of it): no guidance embedding, so CFG.
    "lcm": (LCMScheduler, {}),
}

# (name, sampler, model, steps, guidance, rescale, config overrides)
CASES = [
    ("euler", "euler", "sd15", 8, 7.0, 0.0, {}),
    ("euler_karras", "euler_karras", "sd15", 8, 7.0, 0.0, {}),
    ("euler_a", "euler_a", "sd15", 8, 7.0, 0.0, {}),
    ("heun", "heun", "sd15", 5, 7.0, 0.0, {}),
    ("dpmpp_2m", "dpmpp_2m", "sd15", 8, 7.0, 0.0, {}),
    ("dpmpp_2m_karras", "dpmpp_2m_karras", "sd15", 8, 7.0, 0.0, {}),
    ("dpmpp_2m_karras_20", "dpmpp_2m_karras", "sd15", 20, 5.0, 0.0, {}),
    ("dpmpp_2m_sde_karras", "dpmpp_2m_sde_karras", "sd15", 8, 7.0, 0.0, {}),
    ("ddim", "ddim", "sd15", 8, 7.0, 0.0, {}),
    ("euler_trailing", "euler", "sd15", 6, 7.0, 0.0, dict(timestep_spacing="trailing")),
    ("euler_a_linspace", "euler_a", "sd15", 6, 7.0, 0.0, dict(timestep_spacing="linspace", steps_offset=0)),
    ("dpmpp_2m_linspace", "dpmpp_2m", "sd15", 6, 7.0, 0.0, dict(timestep_spacing="linspace", steps_offset=0)),
    ("ddim_trailing", "ddim", "sd15", 6, 7.0, 0.0, dict(timestep_spacing="trailing")),
    ("euler_rescaled", "euler", "sd15", 8, 7.0, 0.7, {}),
    ("euler_no_cfg", "euler", "sd15", 6, 1.0, 0.0, {}),
    ("euler_v", "euler", "sd15", 6, 7.0, 0.0, dict(prediction_type="v_prediction")),
    ("ddim_v", "ddim", "sd15", 6, 7.0, 0.7, dict(prediction_type="v_prediction", timestep_spacing="trailing")),
    ("dpmpp_2m_karras_v", "dpmpp_2m_karras", "sd15", 8, 7.0, 0.0, dict(prediction_type="v_prediction")),
    ("unipc", "unipc", "sd15", 8, 7.0, 0.0, {}),
    ("unipc_karras_20", "unipc_karras", "sd15", 20, 5.0, 0.0, {}),
    ("unipc_v", "unipc", "sd15", 6, 7.0, 0.0, dict(prediction_type="v_prediction", timestep_spacing="trailing")),
    ("sdxl_unipc", "unipc", "sdxl", 6, 6.0, 0.0, {}),
    ("sdxl_euler_a", "euler_a", "sdxl", 6, 6.0, 0.0, {}),
    ("sdxl_dpmpp_2m_karras", "dpmpp_2m_karras", "sdxl", 8, 6.0, 0.0, {}),
    # (Not on the SDXL UNet: it has an LCM guidance embedding, which Drover's LCM feeds.)
    ("lcm_cfg", "lcm", "sd15", 4, 1.5, 0.0, {}),
    ("lcm_no_cfg", "lcm", "sd15", 4, 1.0, 0.0, {}),
    ("dpmpp_sde_karras", "dpmpp_sde_karras", "sd15", 6, 7.0, 0.0, {}),
    ("dpmpp_sde", "dpmpp_sde", "sd15", 5, 7.0, 0.0, {}),
    ("dpmpp_sde_karras_v", "dpmpp_sde_karras", "sd15", 5, 7.0, 0.0, dict(prediction_type="v_prediction")),
    ("sdxl_dpmpp_sde_karras", "dpmpp_sde_karras", "sdxl", 5, 6.0, 0.0, {}),
]


class NoiseRecorder:
    """Stands in for diffusers' `randn_tensor` in the scheduler modules and keeps every draw."""

    def __init__(self):
        self.draws = []
        self.gen = torch.Generator().manual_seed(0)

    def reset(self, seed):
        self.draws = []
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = torch.randn(tuple(shape), generator=self.gen, dtype=torch.float32)
        self.draws.append(noise.clone())
        return noise.to(dtype or torch.float32)


class PathNoise:
    """Stands in for DPMSolverSDEScheduler's Brownian tree (torchsde): one Brownian path over σ
    sampled exactly at each step's start, midpoint and end, from unit draws taken through the
    recorder. The scheduler asks, per step, for the increment to the midpoint (σ → σ_mid: the
    first draw) and then for the whole step's (σ → σ_next: both increments summed), each
    divided by the square root of its length, as `BrownianTreeNoiseSampler` answers."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.pending = None

    def __call__(self, sigma, sigma_next):
        a, b = float(sigma), float(sigma_next)
        if self.pending is None:
            z = self.recorder((1, 4, 8, 8))
            self.pending = (a, b, z)
            return z
        a0, mid, z1 = self.pending
        assert abs(a0 - a) < 1e-6 * a and b < mid < a, (a0, a, mid, b)
        self.pending = None
        z2 = self.recorder((1, 4, 8, 8))
        return (z1 * (a - mid) ** 0.5 + z2 * (mid - b) ** 0.5) / (a - b) ** 0.5


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' `rescale_noise_cfg` (Lin et al., "Common Diffusion Noise Schedules...", 3.4)."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def load_unet(folder):
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    return unet.eval()


def main():
    recorder = NoiseRecorder()
    scheduling_euler_ancestral_discrete.randn_tensor = recorder
    scheduling_dpmsolver_multistep.randn_tensor = recorder
    scheduling_lcm.randn_tensor = recorder

    gen = torch.Generator().manual_seed(31)
    tensors = {}
    models = {}

    sd15 = load_unet(os.path.join(ROOT, "tiny-unet"))
    cross = sd15.config.cross_attention_dim
    tensors["sd15.init"] = torch.randn(1, 4, 8, 8, generator=gen)
    tensors["sd15.cond"] = torch.randn(1, 77, cross, generator=gen)
    # A negative prompt's context differs from the prompt's in places, as real ones do: with
    # unrelated random contexts, CFG 7 on a random UNet drives latents to |x| ~ 60.
    tensors["sd15.uncond"] = tensors["sd15.cond"] + 0.25 * torch.randn(1, 77, cross, generator=gen)

    def sd15_call(x, t, ctx, _added):
        return sd15(x, t, encoder_hidden_states=ctx).sample

    models["sd15"] = (sd15_call, "sd15")

    sdxl = load_unet(os.path.join(ROOT, "tiny-sdxl-lcm", "unet"))
    cross = sdxl.config.cross_attention_dim
    pooled = sdxl.config.projection_class_embeddings_input_dim - 6 * sdxl.config.addition_time_embed_dim
    tensors["sdxl.init"] = torch.randn(1, 4, 8, 8, generator=gen)
    tensors["sdxl.cond"] = torch.randn(1, 77, cross, generator=gen)
    tensors["sdxl.uncond"] = tensors["sdxl.cond"] + 0.25 * torch.randn(1, 77, cross, generator=gen)
    tensors["sdxl.pooled_cond"] = torch.randn(1, pooled, generator=gen)
    tensors["sdxl.pooled_uncond"] = tensors["sdxl.pooled_cond"] + 0.25 * torch.randn(1, pooled, generator=gen)
    tensors["sdxl.time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])

    def sdxl_call(x, t, ctx, added):
        return sdxl(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample

    models["sdxl"] = (sdxl_call, "sdxl")

    cases = []
    for index, (name, sampler, model, steps, guidance, rescale, overrides) in enumerate(CASES):
        cls, extra = CLASSES[sampler]
        config = dict(BASE, **extra, **overrides)
        sched = cls.from_config(config)
        sched.set_timesteps(steps)
        call, prefix = models[model]
        recorder.reset(1000 + index)
        if isinstance(sched, DPMSolverSDEScheduler):
            sched.noise_sampler = PathNoise(recorder)
        cfg = guidance > 1.0
        cond, uncond = tensors[f"{prefix}.cond"], tensors[f"{prefix}.uncond"]
        ctx = torch.cat([uncond, cond]) if cfg else cond
        added = None
        if model == "sdxl":
            pc, pu = tensors["sdxl.pooled_cond"], tensors["sdxl.pooled_uncond"]
            ids = tensors["sdxl.time_ids"]
            added = ({"text_embeds": torch.cat([pu, pc]), "time_ids": torch.cat([ids, ids])} if cfg
                     else {"text_embeds": pc, "time_ids": ids})
        latents = tensors[f"{prefix}.init"] * sched.init_noise_sigma
        calls = 0
        for t in sched.timesteps:
            inp = torch.cat([latents] * 2) if cfg else latents
            inp = sched.scale_model_input(inp, t)
            out = call(inp, t, ctx, added)
            calls += 1
            if cfg:
                u, c = out.chunk(2)
                out = u + guidance * (c - u)
                if rescale > 0:
                    out = rescale_noise_cfg(out, c, rescale)
            latents = sched.step(out, t, latents, return_dict=False)[0]
        for k, noise in enumerate(recorder.draws):
            tensors[f"{name}.noise.{k}"] = noise
        tensors[f"{name}.final"] = latents
        cases.append(dict(name=name, sampler=sampler, model=model, steps=steps, guidance=guidance,
                          guidance_rescale=rescale, config={k: v for k, v in sorted(config.items())},
                          noise_draws=len(recorder.draws), unet_calls=calls,
                          timesteps=[float(t) for t in sched.timesteps]))
        print(f"{name}: {calls} UNet calls, {len(recorder.draws)} noise draws")

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(ROOT, "samplers.safetensors"))
    with open(os.path.join(ROOT, "samplers.json"), "w") as f:
        json.dump({"cases": cases}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
