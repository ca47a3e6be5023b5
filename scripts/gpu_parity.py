#!/usr/bin/env python3
"""Parity of a drover-node build on each of its devices against the committed diffusers
reference (node/tests/fixtures): the tiny SD1.5 UNet (`unet-eval`), and the tiny SD1.5-LCM
model's text encoder and VAE decoder (`component-eval`), each on the fixture's inputs against
PyTorch's f32 output.

Pure Python (no numpy): reads and writes the small f32 safetensors files itself. Runs
each tool with `--device D` for every D given and prints one JSON line per device and component
with the max absolute error and whether it is within the tolerance of its dtype: 1e-4 on the CPU in f32
(as `cargo test`), 1e-3 on a GPU in f32 (other reduction orders), 1e-2 in f16 and 1e-1 in bf16
(unit roundoff 2^-11 and 2^-8 over ~20 normalised layers; node/tests/parity/half.rs measures
2.4e-3 and 2.0e-2 for them on the CPU). Exits 1 if any device is off.

Usage: scripts/gpu_parity.py DROVER_NODE DEVICE...   (e.g. cpu cuda cuda-f16 cuda-bf16)
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "node", "tests", "fixtures")


def read_f32(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        body = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["shape"], list(struct.unpack(f"<{(b - a) // 4}f", body[a:b])))
    return out


def write_f32(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def tolerance(device):
    if device.endswith("-bf16"):
        return 1e-1
    if device.endswith("-f16"):
        return 1e-2
    return 1e-4 if device == "cpu" else 1e-3


def run_eval(args):
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        return None, run.stderr.strip()[-500:]
    return read_f32(args[args.index("--output") + 1])["out"], None


def main():
    node, devices = sys.argv[1], sys.argv[2:] or ["cpu"]
    want = read_f32(os.path.join(FIXTURES, "parity.safetensors"))
    unet = os.path.join(FIXTURES, "tiny-unet")
    model = os.path.join(FIXTURES, "tiny-sd15-lcm")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {name: os.path.join(tmp, f"{name}.safetensors") for name in ("unet", "text", "vae")}
        write_f32(inputs["unet"], {
            "sample": want["unet.sample"],
            "timestep": want["unet.timestep"],
            "encoder_hidden_states": want["unet.encoder_hidden_states"],
        })
        write_f32(inputs["text"], {"input_ids": want["text.input_ids"]})
        write_f32(inputs["vae"], {"latents": want["vae.latents"]})
        for device in devices:
            checks = [
                ("unet", "unet.out",
                 [node, "unet-eval", "--unet", os.path.join(unet, "diffusion_pytorch_model.safetensors"),
                  "--config", os.path.join(unet, "config.json"), "--inputs", inputs["unet"]]),
                ("text-encoder", "text.hidden",
                 [node, "component-eval", "--component", "text-encoder", "--model", model,
                  "--inputs", inputs["text"]]),
                ("vae", "vae.out",
                 [node, "component-eval", "--component", "vae", "--model", model,
                  "--inputs", inputs["vae"]]),
            ]
            for component, expected, args in checks:
                out = os.path.join(tmp, f"out-{component}-{device}.safetensors")
                got, error = run_eval(args + ["--output", out, "--device", device])
                if got is None:
                    print(json.dumps({"device": device, "component": component, "ok": False,
                                      "error": error}))
                    failed = True
                    continue
                shape, values = got
                ref_shape, ref = want[expected]
                err = (max(abs(a - b) for a, b in zip(values, ref))
                       if shape == ref_shape else float("inf"))
                ok = err <= tolerance(device)
                failed |= not ok
                print(json.dumps({"device": device, "component": component,
                                  "max_abs_error": err, "tolerance": tolerance(device), "ok": ok}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
