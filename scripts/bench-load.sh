#!/usr/bin/env bash
# Model load time on this CPU (drover-node bench-load: files to a pipeline ready to render, f32),
# for the demo SD1.5 and SDXL models: cold (the model's files dropped from the page cache with
# posix_fadvise(DONTNEED) first) and warm (loaded again in the same process). RUNS rounds each
# (NODE_BIN: another drover-node binary to time, e.g. a baseline build);
# prints every JSON line and the medians. Run `cargo build --bin drover-node` first.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-5}"
N="${NODE_BIN:-target/debug/drover-node}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
$N make-model --family sd15 --out "$dir/sd15" >/dev/null
$N make-model --family sdxl --out "$dir/sdxl" >/dev/null
drop_cache() {
    python3 - "$1" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
}
for m in sd15 sdxl; do
    lines=()
    for _ in $(seq "$RUNS"); do
        drop_cache "$dir/$m"
        line=$($N bench-load --model "$dir/$m" --runs 3)
        echo "$line"
        lines+=("$line")
    done
    printf '%s\n' "${lines[@]}" | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
cold = statistics.median(r["first_ms"] for r in rows)
warm = statistics.median(r["warm_median_ms"] for r in rows)
print(json.dumps({"model": "'"$m"'", "bytes_f32": rows[0]["bytes_f32"], "cold_median_ms": round(cold, 1), "warm_median_ms": round(warm, 1), "cold_over_warm": round(cold / warm, 2)}))'
done
