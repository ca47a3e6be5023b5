#!/usr/bin/env bash
# The docker-compose cluster, proven with a real Docker engine (run by .ci/run when one is there):
# build the images offline, `up`, wait for health, generate an image; kill a node container while
# jobs run (they finish on its same-family peer); disconnect a node from the network past the grace
# (its jobs re-run elsewhere); restart the coordinator container (the queue survives on its
# volume); then `down -v`. Prints image sizes and the time from `up` to the first image.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=drovertest DROVER_HTTP_PORT=14280 DROVER_GRPC_PORT=14281
export DROVER_HEARTBEAT_MS=200 DROVER_OFFLINE_GRACE_MS=2000 SIM_STEP_MS=300 RUST_LOG=warn
API="http://127.0.0.1:$DROVER_HTTP_PORT"
P=$COMPOSE_PROJECT_NAME

COMPOSE=docker-compose NAME="compose test"
source scripts/compose-lib.sh
online() { [ "$(curl -s "$API/healthz" | json 'd["nodes_online"]')" = "$1" ]; }
node_state() { curl -s "$API/v1/nodes" | json "[n['state'] for n in d if n['name']=='$1'][0]"; }
submit() { # family steps
    curl -s -X POST "$API/v1/jobs" -H 'content-type: application/json' \
        -d "{\"prompt\":\"compose test\",\"model\":\"$1\",\"size\":\"64x64\",\"steps\":$2}" | json 'd["id"]'
}
job() { curl -s "$API/v1/jobs/$1"; }
all_succeeded() { for id in "$@"; do [ "$(job "$id" | json 'd["state"]')" = succeeded ] || return 1; done; }

start=$(date +%s.%N)
docker-compose up -d
wait_for 60 "a healthy coordinator" sh -c "[ \"\$(docker inspect -f '{{.State.Health.Status}}' ${P}_coordinator_1)\" = healthy ]"
wait_for 60 "three nodes online" online 3
code=$(curl -s -o /tmp/drover-compose.png -w '%{http_code}' -X POST "$API/v1/generate" \
    -H 'content-type: application/json' -d '{"prompt":"a lighthouse","model":"sd15","steps":1}')
[ "$code" = 200 ] || fail "generate answered $code"
first=$(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')")
echo "compose: first image ${first}s after up ($(stat -c %s /tmp/drover-compose.png) bytes)"

# 1. kill -9 one SD1.5 node while jobs run: every job finishes, on the other SD1.5 node.
ids=(); for _ in $(seq 8); do ids+=("$(submit sd15 6)"); done
wait_for 20 "jobs running on sd15-a" sh -c "curl -s $API/v1/nodes | python3 -c \"import json,sys; d=json.load(sys.stdin); exit(0 if [n for n in d if n['name']=='sd15-a' and n['running']>0] else 1)\""
docker-compose kill sd15-a
wait_for 90 "every job to succeed after the kill" all_succeeded "${ids[@]}"
moved=0
for id in "${ids[@]}"; do
    if job "$id" | json 'any("offline" in a["outcome"] or "expired" in a["outcome"] for a in d["attempts"])' | grep -q True; then
        moved=$((moved + 1))
    fi
done
[ "$moved" -gt 0 ] || fail "no job was re-run after the kill"
echo "compose: kill sd15-a -> ${#ids[@]} jobs succeeded, $moved re-run on sd15-b"

# 2. cut sd15-b off the network past the grace: its jobs re-run on sd15-a.
docker-compose start sd15-a
wait_for 60 "sd15-a back online" sh -c "[ \"\$(curl -s $API/v1/nodes | python3 -c \"import json,sys; print([n['state'] for n in json.load(sys.stdin) if n['name']=='sd15-a'][0])\")\" = online ]"
ids=(); for _ in $(seq 6); do ids+=("$(submit sd15 6)"); done
wait_for 20 "jobs running on sd15-b" sh -c "curl -s $API/v1/nodes | python3 -c \"import json,sys; d=json.load(sys.stdin); exit(0 if [n for n in d if n['name']=='sd15-b' and n['running']>0] else 1)\""
docker network disconnect "${P}_default" "${P}_sd15-b_1"
wait_for 90 "every job to succeed after the partition" all_succeeded "${ids[@]}"
[ "$(node_state sd15-b)" = offline ] || fail "sd15-b is not offline after the partition"
docker network connect "${P}_default" "${P}_sd15-b_1"
echo "compose: partitioned sd15-b -> ${#ids[@]} jobs succeeded elsewhere"

# 3. restart the coordinator container with jobs queued: they survive on the volume and run.
docker-compose stop sd15-a sd15-b
wait_for 30 "sd15 nodes offline" sh -c "[ \"\$(curl -s $API/healthz | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"nodes_online\"])')\" = 1 ]"
ids=(); for _ in $(seq 3); do ids+=("$(submit sd15 2)"); done
docker-compose restart coordinator
wait_for 60 "the coordinator back" sh -c "curl -sf $API/healthz"
for id in "${ids[@]}"; do
    [ "$(job "$id" | json 'd["state"]')" = queued ] || fail "job $id did not survive the restart queued"
done
docker-compose start sd15-a sd15-b
wait_for 90 "the queued jobs to run after the restart" all_succeeded "${ids[@]}"
echo "compose: coordinator restarted with ${#ids[@]} jobs queued -> all survived and succeeded"
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^drover-(coordinator|node):local' | sed 's/^/compose: image /'
echo "compose test passed"
