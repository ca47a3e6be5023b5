#!/usr/bin/env python3
"""Builds an independent reference for Drover's LoRA merge: the committed tiny UNet with the
committed kohya and PEFT LoRA files loaded by diffusers' own LoRA loader (key conversion, alpha
scaling, PEFT injection; `load_lora_into_unet`, then `fuse_lora` at strength 0.8), run on the
parity fixture's UNet inputs.

`scripts/make_fixtures.py` writes the LoRA files and a reference merged by hand; this checks
Drover against diffusers reading the same files, so a key or scale misread the same way in both
hand-written merges cannot pass.

Reads:  node/tests/fixtures/tiny-unet/, lora-kohya.safetensors, lora-peft.safetensors,
        parity.safetensors (unet.sample, unet.encoder_hidden_states)
Writes: node/tests/fixtures/lora-diffusers.safetensors  (kohya.out, peft.out)

Run from the repository root: `python3 scripts/make_lora_reference.py` (torch, diffusers, peft,
safetensors from PyPI). Nothing is downloaded.
"""

import os

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "node", "tests", "fixtures")
STRENGTH = 0.8
torch.set_grad_enabled(False)


def main():
    inputs = load_file(os.path.join(ROOT, "parity.safetensors"))
    sample, context = inputs["unet.sample"], inputs["unet.encoder_hidden_states"]
    out = {}
    for name in ("kohya", "peft"):
        unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "tiny-unet"), torch_dtype=torch.float32).eval()
        path = os.path.join(ROOT, f"lora-{name}.safetensors")
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(path)
        unet_keys = {k: v.float() for k, v in state_dict.items() if k.startswith("unet.")}
        assert unet_keys, f"diffusers found no UNet keys in {path}"
        StableDiffusionPipeline.load_lora_into_unet(unet_keys, alphas, unet=unet, adapter_name="x")
        unet.fuse_lora(lora_scale=STRENGTH)
        out[f"{name}.out"] = unet(sample, 759, encoder_hidden_states=context).sample.contiguous()
        print(f"{name}: {len(unet_keys)} tensors loaded by diffusers, |out| max {out[f'{name}.out'].abs().max():.3f}")
    save_file(out, os.path.join(ROOT, "lora-diffusers.safetensors"))


if __name__ == "__main__":
    main()
