#!/usr/bin/env python3
"""Checks Drover's single-file (LDM) names against diffusers' own converters and records
diffusers' verdict, so `cargo test` can hold Drover's name maps to it.

For each committed tiny model (the SD1-style UNet, the SD1.5-LCM UNet with its guidance
embedding, the SDXL UNet with text_time, and both VAEs), `drover-node ldm-names` gives the LDM
name Drover uses for every diffusers tensor. Each LDM name becomes a one-element tensor holding
its index, and the whole state dict goes through diffusers' `convert_ldm_unet_checkpoint` /
`convert_ldm_vae_checkpoint` (the code `from_single_file` runs). Where diffusers puts each index
says which diffusers name it reads that LDM name as. Written:

  node/tests/fixtures/ldm-names.json   {model: [[diffusers name, LDM name], ...]} as diffusers
                                       converts them, plus the names it could not place

Run from the repository root after `cargo build -p drover-node`:
`python3 scripts/make_ldm_reference.py` (torch, diffusers from PyPI). Nothing is downloaded.
"""

import json
import os
import subprocess

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "node", "tests", "fixtures")
NODE = os.path.join(ROOT, "target", "debug", "drover-node")

MODELS = {
    "sd1_unet": ("unet", "tiny-unet"),
    "sd15_lcm_unet": ("unet", "tiny-sd15-lcm/unet"),
    "sdxl_unet": ("unet", "tiny-sdxl-lcm/unet"),
    "sd15_vae": ("vae", "tiny-sd15-lcm/vae"),
    "sdxl_vae": ("vae", "tiny-sdxl-lcm/vae"),
}


def drover_names(kind, folder):
    out = subprocess.run([NODE, "ldm-names", f"--{kind}", os.path.join(FIXTURES, folder)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[kind]


def main():
    result = {}
    for model, (kind, folder) in MODELS.items():
        pairs = drover_names(kind, folder)
        with open(os.path.join(FIXTURES, folder, "config.json")) as f:
            config = json.load(f)
        checkpoint = {ldm: torch.tensor([float(i)]) for i, (_, ldm) in enumerate(pairs)}
        convert = convert_ldm_unet_checkpoint if kind == "unet" else convert_ldm_vae_checkpoint
        converted = convert(checkpoint, config)
        placed = {}
        for diffusers_name, value in converted.items():
            i = int(value.flatten()[0].item())
            placed[pairs[i][1]] = diffusers_name
        verdict = [[placed[ldm], ldm] for _, ldm in pairs if ldm in placed]
        unplaced = [ldm for _, ldm in pairs if ldm not in placed]
        agree = sum(1 for (d, ldm) in pairs if placed.get(ldm) == d)
        print(f"{model}: {len(pairs)} tensors, diffusers places {len(verdict)}, agrees on {agree}, "
              f"unplaced {len(unplaced)}")
        result[model] = {"pairs": verdict, "unplaced": unplaced}
    with open(os.path.join(FIXTURES, "ldm-names.json"), "w") as f:
        json.dump(result, f, indent=0)
        f.write("\n")


if __name__ == "__main__":
    main()
