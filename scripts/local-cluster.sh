#!/usr/bin/env bash
# Starts a local Drover cluster on this machine: one coordinator (REST on :4200, gRPC on :4201,
# embedded sled under .local-cluster/) and three nodes:
#   sd15-cpu-a              BACKEND=cpu: the real Burn SD1.5 LCM pipeline on this CPU, running a
#                           small SD1.5-shaped model with RANDOM weights generated at first start
#                           (`drover-node make-model`): real computation, noise images; it also
#                           holds a small random-weight ×4 upscaler (`make-model --upscaler x4`).
#   sd15-cpu-b              the same with a standard (non-LCM) SD1.5-shaped model: Euler, DPM++ 2M,
#                           ... with classifier-free guidance (`make-model --variant standard`).
#   sdxl-cpu                BACKEND=cpu: the Burn SDXL LCM pipeline (two text encoders, text_time
#                           conditioning) on a small SDXL-shaped random-weight model.
# For real pictures point MODEL_ROOT/MODEL at real LCM weights (see README). Ctrl-C stops
# everything. Ports: DROVER_HTTP_PORT, DROVER_GRPC_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

HTTP_PORT="${DROVER_HTTP_PORT:-4200}"
GRPC_PORT="${DROVER_GRPC_PORT:-4201}"
DIR=.local-cluster
mkdir -p "$DIR"

cargo build --bin drover-coordinator --bin drover-node

MODELS="$DIR/models"
for family in sd15 sdxl; do
    if [ ! -f "$MODELS/demo-$family/RANDOM_WEIGHTS.txt" ]; then
        target/debug/drover-node make-model --family "$family" --out "$MODELS/demo-$family"
    fi
done
if [ ! -f "$MODELS/demo-sd15-standard/RANDOM_WEIGHTS.txt" ]; then
    target/debug/drover-node make-model --family sd15 --variant standard --seed 2 \
        --out "$MODELS/demo-sd15-standard"
fi

if [ ! -f "$MODELS/demo-x4.safetensors" ]; then
    target/debug/drover-node make-model --upscaler x4 --features 32 --depth 8 \
        --out "$MODELS/demo-x4.safetensors"
fi

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

DROVER_HTTP_ADDR="127.0.0.1:$HTTP_PORT" DROVER_GRPC_ADDR="127.0.0.1:$GRPC_PORT" \
DROVER_DATA_DIR="$DIR/coordinator-data" \
    target/debug/drover-coordinator >"$DIR/coordinator.log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null; then break; fi
    sleep 0.1
done

start_cpu_node() { # name model [upscalers]
    COORDINATOR_URL="http://127.0.0.1:$GRPC_PORT" NODE_NAME="$1" BACKEND=cpu NUM_WORKERS=1 \
    MODEL_ROOT="$MODELS" MODEL="$2" UPSCALER="${3:-}" target/debug/drover-node >"$DIR/$1.log" 2>&1 &
    pids+=($!)
}
start_cpu_node sd15-cpu-a demo-sd15 demo-x4
start_cpu_node sd15-cpu-b demo-sd15-standard
start_cpu_node sdxl-cpu demo-sdxl

cat <<MSG

Drover local cluster is up (logs in $DIR/). Every node runs the real Burn pipeline on this CPU
with a random-weight demo model: their images are noise, by design.

  nodes:         curl -s localhost:$HTTP_PORT/v1/nodes
  make an image: curl -s -X POST localhost:$HTTP_PORT/v1/generate \\
                      -H 'content-type: application/json' \\
                      -d '{"prompt":"a lighthouse at dusk","model":"sd15","seed":7}' -o lighthouse.png
  upscaled ×4 (512² → 2048², on sd15-cpu-a, the node holding the upscaler):
                 curl -s -X POST localhost:$HTTP_PORT/v1/generate -H 'content-type: application/json' \
                      -d '{"prompt":"a lighthouse at dusk","upscale":{}}' -o big.png
  AUTOMATIC1111-style (Euler a, 20 steps, CFG 7: runs on the standard node):
                 curl -s -X POST localhost:$HTTP_PORT/sdapi/v1/txt2img -H 'content-type: application/json' \
                      -d '{"prompt":"a red fox","sampler_name":"Euler a","steps":20,"cfg_scale":7,"width":256,"height":256}'
  SDXL (1024² by default, ~25 s on a 2-core CPU):
                 curl -s -X POST localhost:$HTTP_PORT/v1/generate -H 'content-type: application/json' \
                      -d '{"prompt":"a lighthouse at dusk","model":"sdxl","size":"512x512"}' -o xl.png

Ctrl-C stops the cluster.
MSG
wait
