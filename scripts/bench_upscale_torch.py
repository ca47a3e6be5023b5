#!/usr/bin/env python3
"""Times one upscale of an image with spandrel (PyTorch, CPU, f32) on the same file and with the
same tiling as `drover-node upscale`, and prints one JSON line like it.

    python3 scripts/bench_upscale_torch.py MODEL.safetensors IMAGE.png --tile 256 --pad 32 [--threads 2]

Tiling follows Real-ESRGAN's `tile_process`, as Drover does: each tile is run with `pad` pixels of
real image around it and only its own output is kept (`--tile 0`: the whole image at once).
"""

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from spandrel import ModelLoader


def upscale(model, x, scale, tile, pad):
    _, _, h, w = x.shape
    if tile == 0 or (h <= tile and w <= tile):
        return model(x)
    out = torch.zeros(1, 3, h * scale, w * scale)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            cy0, cx0 = max(y0 - pad, 0), max(x0 - pad, 0)
            cy1, cx1 = min(y1 + pad, h), min(x1 + pad, w)
            y = model(x[:, :, cy0:cy1, cx0:cx1])
            oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                y[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("image")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--pad", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    desc = ModelLoader().load_from_state_dict({k: v.float() for k, v in load_file(args.model).items()})
    model = desc.model.eval()
    load_ms = (time.perf_counter() - started) * 1000
    img = np.asarray(Image.open(args.image).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous()
    with torch.inference_mode():
        for _ in range(args.warmup):
            upscale(model, x, desc.scale, args.tile, args.pad)
        started = time.perf_counter()
        y = upscale(model, x, desc.scale, args.tile, args.pad)
        upscale_ms = (time.perf_counter() - started) * 1000
    _, _, h, w = x.shape
    print(json.dumps({
        "engine": f"spandrel {desc.architecture.id} / torch {torch.__version__}",
        "input": f"{w}x{h}", "output": f"{y.shape[3]}x{y.shape[2]}",
        "tile": args.tile, "pad": args.pad, "threads": args.threads,
        "load_ms": load_ms, "upscale_ms": upscale_ms,
        "ms_per_input_megapixel": upscale_ms / (w * h / 1e6),
    }))


if __name__ == "__main__":
    main()
