#!/usr/bin/env python3
"""Builds the super-resolution parity fixtures: tiny random networks of the architectures Drover's
upscaler implements, built and run by spandrel (PyPI), the reference implementation ComfyUI and
chaiNNer load ESRGAN-family and compact Real-ESRGAN models with.

Writes:
  node/tests/fixtures/upscalers/<case>.safetensors  each network's weights (f16), named as the
                                                    published files of its family name them
  node/tests/fixtures/upscale.json                  one entry per case: file, architecture and the
                                                    shapes spandrel read back from the file
  node/tests/fixtures/upscale.safetensors           per case the input image (f32, [1, 3, h, w] in
                                                    [0, 1]) and spandrel's output (unclamped)

Cases:
  esrgan-x4        ESRGAN's original sequential names (model.0, model.1.sub.N.RDBM.convK.0, ...)
  realesrgan-x4    Real-ESRGAN / basicsr names (conv_first, body.N.rdbM.convK, conv_up1, conv_hr)
  realesrgan-x2    Real-ESRGAN ×2: pixel-unshuffle by 2 in front, odd-sized input (reflect pad)
  bsrgan-x2        BSRGAN / RealSR names (RRDB_trunk, trunk_conv, upconv1, HRconv), one upsample
  compact-x4       SRVGGNetCompact (realesr-general / animevideov3 shape), PReLU
  compact-x2       the same at ×2

Every renamed file is loaded back through spandrel's own detection and must reproduce the network
it came from, so the names are spandrel's reading of each family, not Drover's.

The weights are rounded to f16 before the reference runs, so the committed file and the reference
hold the same numbers. The last convolution is rescaled so outputs spread over [0, 1] like images
(spandrel's default init leaves them near 0, which would make byte comparisons vacuous).

Run from the repository root: `python3 scripts/make_upscaler_fixtures.py` (torch, spandrel,
safetensors from PyPI). Nothing is downloaded.
"""

import json
import os
import re

import torch
from safetensors.torch import save_file
from spandrel import ModelLoader
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "node", "tests", "fixtures")
NETS = os.path.join(ROOT, "upscalers")


def esrgan_to_realesrgan(state, blocks, upsamples):
    """ESRGAN sequential names -> Real-ESRGAN names."""
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", k)
        if m:
            i, j, c, t = m.groups()
            out[f"body.{i}.rdb{j}.conv{c}.{t}"] = v
            continue
        idx, t = re.fullmatch(r"model\.(?:1\.sub\.)?(\d+)\.(weight|bias)", k).groups()
        idx = int(idx)
        if k.startswith("model.1.sub."):
            assert idx == blocks
            name = "conv_body"
        elif idx == 0:
            name = "conv_first"
        elif idx == 3 * upsamples + 2:
            name = "conv_hr"
        elif idx == 3 * upsamples + 4:
            name = "conv_last"
        else:
            assert idx % 3 == 0, k
            name = f"conv_up{idx // 3}"
        out[f"{name}.{t}"] = v
    return out


def realesrgan_to_bsrgan(state):
    out = {}
    for k, v in state.items():
        k = re.sub(r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2.", k)
        k = k.replace("conv_body.", "trunk_conv.").replace("conv_hr.", "HRconv.")
        k = re.sub(r"^conv_up(\d)\.", r"upconv\1.", k)
        out[k] = v
    return out


def half_rounded(model):
    """Rounds every parameter to f16 (kept in f32), so file and reference agree exactly."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def spread_output(model, last, x):
    """Rescales the last convolution so the output has mean 0.5 and spread 0.25."""
    with torch.no_grad():
        y = model(x)
        last.weight.mul_(0.25 / y.std().clamp_min(1e-6))
        y = model(x)
        last.bias.add_(0.5 - y.mean())


def main():
    torch.manual_seed(20261204)
    os.makedirs(NETS, exist_ok=True)
    cases, tensors = [], {}

    def record(name, model, file_state, shape, expect):
        half_rounded(model)
        model.eval()
        # Store what the reference runs: parameters (f32, f16-exact) under the file's names.
        file_state = {k: v.detach().half().contiguous() for k, v in file_state().items()}
        path = os.path.join(NETS, f"{name}.safetensors")
        save_file(file_state, path)
        # spandrel must read the file back as the same network.
        desc = ModelLoader().load_from_state_dict({k: v.float() for k, v in file_state.items()})
        loaded = desc.model.eval()
        x = torch.rand(shape)
        with torch.no_grad():
            y = model(x)
            y2 = loaded(x)
        assert torch.equal(y, y2), f"{name}: spandrel reads the renamed file as another network"
        assert desc.scale == expect["scale"], (name, desc.scale)
        tensors[f"{name}.input"] = x.contiguous()
        tensors[f"{name}.output"] = y.contiguous()
        cases.append(
            dict(
                name=name,
                file=f"upscalers/{name}.safetensors",
                architecture=desc.architecture.id,
                tags=desc.tags,
                input_shape=list(shape),
                output_shape=list(y.shape),
                **expect,
            )
        )
        print(f"{name}: {desc.architecture.id} x{desc.scale} {desc.tags}, out {tuple(y.shape)}, "
              f"range {y.min():.3f}..{y.max():.3f}")

    # ESRGAN x4, original names: spandrel's native layout.
    m = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    probe = torch.rand(1, 3, 12, 12)
    spread_output(m, m.model[-1], probe)
    record("esrgan-x4", m, m.state_dict, (1, 3, 12, 10),
           dict(scale=4, features=8, blocks=1, growth=32, upsamples=2, unshuffle=1, naming="esrgan"))

    # Real-ESRGAN x4 names.
    m = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    spread_output(m, m.model[-1], probe)
    record("realesrgan-x4", m, lambda m=m: esrgan_to_realesrgan(m.state_dict(), 1, 2), (1, 3, 10, 14),
           dict(scale=4, features=8, blocks=1, growth=32, upsamples=2, unshuffle=1, naming="real_esrgan"))

    # Real-ESRGAN x2: 12 input channels after pixel-unshuffle by 2, two x2 stages.
    m = ESRGAN(in_nc=12, out_nc=3, num_filters=8, num_blocks=1, scale=4, shuffle_factor=2)
    spread_output(m, m.model[-1], probe)
    record("realesrgan-x2", m, lambda m=m: esrgan_to_realesrgan(m.state_dict(), 1, 2), (1, 3, 13, 11),
           dict(scale=2, features=8, blocks=1, growth=32, upsamples=2, unshuffle=2, naming="real_esrgan"))

    # BSRGAN names, one x2 stage.
    m = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    spread_output(m, m.model[-1], probe)
    record("bsrgan-x2", m,
           lambda m=m: realesrgan_to_bsrgan(esrgan_to_realesrgan(m.state_dict(), 1, 1)), (1, 3, 9, 12),
           dict(scale=2, features=8, blocks=1, growth=32, upsamples=1, unshuffle=1, naming="bsrgan"))

    # Compact (SRVGGNet) x4 and x2.
    for scale, shape in ((4, (1, 3, 12, 16)), (2, (1, 3, 11, 9))):
        m = Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=scale)
        with torch.no_grad():
            # PReLU slopes away from their 0.25 init, so each channel's slope matters.
            for layer in m.body:
                if isinstance(layer, torch.nn.PReLU):
                    layer.weight.uniform_(0.05, 0.45)
            m.body[-1].weight.mul_(0.5)
        record(f"compact-x{scale}", m, m.state_dict, shape,
               dict(scale=scale, features=16, convs=4))

    save_file(tensors, os.path.join(ROOT, "upscale.safetensors"))
    with open(os.path.join(ROOT, "upscale.json"), "w") as f:
        json.dump(dict(cases=cases), f, indent=1)


if __name__ == "__main__":
    main()
