#!/usr/bin/env bash
# Runs on a GPU machine (CUDA + PyTorch, no Rust): UNet parity of the cuda build in f32/f16/bf16
# against the committed diffusers reference (scripts/gpu_parity.py), then one SD1.5-size UNet step
# (LCM variant, 512², batch 1, random weights) and one SDXL step (1024²), diffusers in PyTorch
# against Burn CUDA, in the same session. Expects bench-carry/ (made by scripts/gpu-bench-prepare.sh):
#   drover-node.xz   a drover-node built with `--features cuda`
#   wheels/          diffusers and its pure-Python dependencies, installed offline
# Results go to $OUT (or ./gpu-bench-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-bench-out}"
mkdir -p "$OUT"
export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --find-links bench-carry/wheels diffusers 2>&1 | tail -2
xz -dc bench-carry/drover-node.xz > /tmp/drover-node && chmod +x /tmp/drover-node
RUNS="${RUNS:-10}"
run() { # label, command...
    local label="$1"; shift
    echo "== $label"
    timeout "${STEP_TIMEOUT:-150}" "$@" 2>"$OUT/$label.err" | tee "$OUT/$label.json"
    tail -3 "$OUT/$label.err"
}
echo "== parity"
python3 scripts/gpu_parity.py /tmp/drover-node cpu cuda cuda-f16 cuda-bf16 | tee "$OUT/parity.json"
run torch-f16 python3 scripts/bench_unet_torch.py --shape sd15-lcm --size 512 --device cuda --dtype f16 --warmup 3 --runs "$RUNS"
run burn-f16 /tmp/drover-node bench-unet --shape sd15-lcm --size 512 --device cuda-f16 --warmup 2 --runs "$RUNS"
run torch-f32 python3 scripts/bench_unet_torch.py --shape sd15-lcm --size 512 --device cuda --dtype f32 --warmup 3 --runs "$RUNS"
run burn-f32 /tmp/drover-node bench-unet --shape sd15-lcm --size 512 --device cuda --warmup 2 --runs "$RUNS"
run torch-sdxl-f16 python3 scripts/bench_unet_torch.py --shape sdxl --size 1024 --device cuda --dtype f16 --warmup 3 --runs "$RUNS"
run burn-sdxl-f16 /tmp/drover-node bench-unet --shape sdxl --size 1024 --device cuda-f16 --warmup 2 --runs "$RUNS"
