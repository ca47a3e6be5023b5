#!/usr/bin/env bash
# One UNet step, Burn (drover-node bench-unet, flex CPU backend) against PyTorch/diffusers on the
# same CPU in the same run, 2 threads each, random weights. Prints both JSON lines and the ratio.
# Shapes: the parity fixtures' tiny SD1.5 and SDXL UNets at 64², the demo SD1.5 UNet at 512².
# Needs: python3 with torch + diffusers (pip install torch diffusers).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --bin drover-node
RUNS="${RUNS:-10}"
ratio() { python3 -c "import json,sys; r=json.loads(sys.argv[1]); t=json.loads(sys.argv[2]); print(f'  burn/torch median ratio: {r[\"median_ms\"]/t[\"median_ms\"]:.2f}x ({r[\"median_ms\"]:.1f} ms vs {t[\"median_ms\"]:.1f} ms)')" "$1" "$2"; }
for case in "node/tests/fixtures/tiny-unet/config.json 64" "demo 512" \
            "node/tests/fixtures/tiny-sdxl-lcm/unet/config.json 64"; do
    set -- $case
    rust=$(RAYON_NUM_THREADS=2 target/debug/drover-node bench-unet --shape "$1" --size "$2" --runs "$RUNS" --warmup 2)
    torch=$(python3 scripts/bench_unet_torch.py --shape "$1" --size "$2" --runs "$RUNS" --warmup 2 --threads 2 2>/dev/null)
    echo "$rust"
    echo "$torch"
    ratio "$rust" "$torch"
done
