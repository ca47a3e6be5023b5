#!/usr/bin/env bash
# The replicated coordinator's figures (BENCHMARKS.md, "Replicated coordinator"), same run, same
# build, this machine:
#  1. throughput and added latency, one coordinator vs three replicas (every replica on this one
#     machine, linked directly, loaded through the leader): drover-loadgen --replicas 1, then
#     --replicas 3, twice;
#  2. fail-over: the fault test's leader killed DROVER_HA_KILLS times (default 8) while clients
#     submit DROVER_HA_JOBS jobs (default 1600); it prints each time from kill -9 to the first 2xx.
# PROFILE=release measures the release build (a full optimised build, ~20 min from clean).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-dev}
dir=$([ "$profile" = release ] && echo target/release || echo target/debug)
cargo build --profile "$profile" -p drover-tests --bins
args=(--nodes 4 --workers 8 --clients ${CLIENTS:-16} --seconds ${SECONDS_PER_PHASE:-6})
# Two A/B pairs: this machine's figures drift between runs by more than a single pair shows.
for pair in 1 2; do
    for replicas in 1 3; do
        echo "== pair $pair: $replicas replica(s)"
        RUST_LOG=warn "$dir/drover-loadgen" --replicas "$replicas" "${args[@]}" | grep -E "one client|saturation|paced|cpu per job"
    done
done
echo "== fail-over"
DROVER_HA_JOBS=${DROVER_HA_JOBS:-1600} DROVER_HA_KILLS=${DROVER_HA_KILLS:-8} \
    cargo test --profile "$profile" -p drover-tests --test replicas leader_kills -- --nocapture 2>&1 |
    grep -E "round|partition|accepted in|fail-over|test result"
