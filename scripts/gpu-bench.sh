#!/usr/bin/env bash
# The GPU table of BENCHMARKS.md in one run (≤ 8 minutes on an H100/H200), on a machine with CUDA
# and PyTorch and no Rust. Expects bench-carry/ (made by scripts/gpu-bench-prepare.sh):
#   drover-node.xz, drover-coordinator.xz   built here with `--features cuda` (node)
#   wheels/                                 diffusers and its pure-Python dependencies
# Steps, each with its own time limit (STEP_TIMEOUT, default 150 s), results under $OUT:
#   1. parity: UNet, text encoder and VAE decoder of the cuda build in f32/f16/bf16 against the
#      committed diffusers reference (scripts/gpu_parity.py), with the node's kernel choice and
#      with DROVER_CUDA_KERNELS=burn;
#      a whole 4-step LCM image of the tiny fixture model on cuda against the CPU pipeline's.
#   2. one UNet step, diffusers fp16 against Drover: SD1.5-LCM 512² (both kernel choices) and
#      SDXL 1024², random weights at the published shapes.
#   3. a whole image, SD1.5-LCM 4 steps 512² (text encoder + UNet + VAE + PNG): diffusers
#      LatentConsistencyModelPipeline against `drover-node render`, same random model folder,
#      with the GPU memory each process held at its peak.
#   4. node cold start (process start → models loaded, kernels warmed, registered with a
#      coordinator) with an empty kernel cache, then again with the cache it left.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-bench-out}"
mkdir -p "$OUT"
export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
export RUST_LOG="${RUST_LOG:-warn}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --find-links bench-carry/wheels diffusers 2>&1 | tail -2
for bin in drover-node drover-coordinator; do
    xz -dc "bench-carry/$bin.xz" > "/tmp/$bin" && chmod +x "/tmp/$bin"
done
NODE=/tmp/drover-node
RUNS="${RUNS:-10}"
STEP_TIMEOUT="${STEP_TIMEOUT:-150}"
run() { # label, command...  (stdout → $OUT/label.json, stderr → $OUT/label.err)
    local label="$1"; shift
    echo "== $label"
    timeout "$STEP_TIMEOUT" "$@" 2>"$OUT/$label.err" | tee "$OUT/$label.json"
    tail -3 "$OUT/$label.err"
}
used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
peak_while() { # label, command...: runs it while sampling GPU memory; prints the peak above idle
    local label="$1"; shift
    local idle; idle=$(used_mib)
    ( while :; do used_mib; sleep 0.2; done ) > "$OUT/$label.mem" &
    local sampler=$!
    run "$label" "$@"
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    echo "{\"label\": \"$label\", \"idle_mib\": $idle, \"peak_mib\": $(sort -n "$OUT/$label.mem" | tail -1), \"held_mib\": $(( $(sort -n "$OUT/$label.mem" | tail -1) - idle ))}" | tee "$OUT/$label.memory.json"
}

echo "== 1. parity"
run parity python3 scripts/gpu_parity.py "$NODE" cpu cuda cuda-f16 cuda-bf16
DROVER_CUDA_KERNELS=burn run parity-burn-kernels python3 scripts/gpu_parity.py "$NODE" cuda-f16
TINY=node/tests/fixtures/tiny-sd15-lcm
for dev in cpu cuda cuda-f16; do
    run "image-$dev" "$NODE" render --model "$TINY" --device "$dev" --steps 4 --guidance 8 \
        --size 128 --seed 3 --out "$OUT/image-$dev.png"
done
# f32 on the GPU differs from the CPU by reduction order only (and f16 flash tiles, f32
# accumulation); on the CPU the same image in f16 is 0.02 levels off on average, 1 at most, in
# bf16 0.17 and 1: the GPU may add the tiles' f16 rounding and other reduction orders, so f16 is
# held to a mean of 1 level and a maximum of 8.
run image-parity-cuda python3 scripts/gpu_render_bench.py compare "$OUT/image-cpu.png" "$OUT/image-cuda.png" --max-mean 0.5 --max-abs 4
run image-parity-cuda-f16 python3 scripts/gpu_render_bench.py compare "$OUT/image-cpu.png" "$OUT/image-cuda-f16.png" --max-mean 1 --max-abs 8

echo "== 2. one UNet step"
run torch-f16 python3 scripts/bench_unet_torch.py --shape sd15-lcm --size 512 --device cuda --dtype f16 --warmup 3 --runs "$RUNS"
run burn-f16 "$NODE" bench-unet --shape sd15-lcm --size 512 --device cuda-f16 --warmup 2 --runs "$RUNS"
DROVER_CUDA_KERNELS=burn run burn-f16-burn-kernels "$NODE" bench-unet --shape sd15-lcm --size 512 --device cuda-f16 --warmup 2 --runs 3
run torch-sdxl-f16 python3 scripts/bench_unet_torch.py --shape sdxl --size 1024 --device cuda --dtype f16 --warmup 3 --runs "$RUNS"
peak_while burn-sdxl-f16 "$NODE" bench-unet --shape sdxl --size 1024 --device cuda-f16 --warmup 2 --runs "$RUNS"

echo "== 3. whole image"
FULL=/tmp/sd15-lcm-full
run make-model python3 scripts/gpu_render_bench.py make "$FULL"
run diffusers-image python3 scripts/gpu_render_bench.py diffusers "$FULL" --runs 5 --warmup 2
for i in 1 2; do
    peak_while "drover-image-$i" "$NODE" render --model "$FULL" --device cuda-f16 --steps 4 \
        --guidance 8 --size 512 --warmup 2 --out "$OUT/drover-full.png"
done

echo "== 4. node cold start"
CACHE=/tmp/drover-node-cache
rm -rf "$CACHE" /tmp/coordinator-data
DROVER_HTTP_ADDR=127.0.0.1:4200 DROVER_GRPC_ADDR=127.0.0.1:4201 DROVER_DATA_DIR=/tmp/coordinator-data \
    /tmp/drover-coordinator > "$OUT/coordinator.log" 2>&1 &
COORD=$!
sleep 1
cold_start() { # label
    local ready=/tmp/drover-node.ready
    rm -f "$ready"
    local start; start=$(date +%s%N)
    COORDINATOR_URL=http://127.0.0.1:4201 NODE_NAME=gpu BACKEND=cuda MODEL_ROOT=/tmp MODEL=sd15-lcm-full \
        DROVER_NODE_CACHE_DIR="$CACHE" DROVER_READY_FILE="$ready" "$NODE" > "$OUT/$1.log" 2>&1 &
    local pid=$!
    for _ in $(seq $((STEP_TIMEOUT * 10))); do
        [ -f "$ready" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    local end; end=$(date +%s%N)
    local registered=false; [ -f "$ready" ] && registered=true
    echo "{\"label\": \"$1\", \"registered\": $registered, \"seconds\": $(( (end - start) / 1000000 ))e-3, \"cache_files\": $(find "$CACHE" -type f | wc -l)}" | tee "$OUT/$1.json"
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
}
echo "== cold-start-empty-cache"; cold_start cold-start-empty-cache
echo "== cold-start-warm-cache"; cold_start cold-start-warm-cache
kill "$COORD" 2>/dev/null
echo "== done"
