#!/usr/bin/env bash
# The three-replica compose cluster (docker-compose.ha.yml), proven with a real Docker engine (run
# by .ci/run when one is there): build the images offline, `up`, wait for a leader, generate an
# image through a follower (`curl -L` follows its 307); kill -9 the leader's container while jobs
# wait: a new leader within seconds, every accepted job succeeds, the first image is still there;
# the old leader restarted follows; then `down -v`. Prints the fail-over time.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=droverha DROVER_HTTP_PORT_1=14290 DROVER_HTTP_PORT_2=14292 DROVER_HTTP_PORT_3=14294
export DROVER_HEARTBEAT_MS=200 DROVER_OFFLINE_GRACE_MS=2000 SIM_STEP_MS=100 RUST_LOG=warn
COMPOSE="docker-compose -f docker-compose.ha.yml"
PORTS=($DROVER_HTTP_PORT_1 $DROVER_HTTP_PORT_2 $DROVER_HTTP_PORT_3)

NAME="compose ha test"
source scripts/compose-lib.sh
# The leader's id, as the first replica that answers says it.
leader() {
    for port in "${PORTS[@]}"; do
        id=$(curl -s -m 1 "http://127.0.0.1:$port/v1/cluster" | json 'd["leader_id"]' 2>/dev/null) || continue
        [ -n "$id" ] && [ "$id" != None ] && { echo "$id"; return 0; }
    done
    return 1
}
leads() { [ "$(leader)" = "$1" ]; }
not_leader() { l=$(leader) && [ "$l" != "$1" ]; }
online() { [ "$(curl -sL "http://127.0.0.1:$1/healthz" | json 'd.get("nodes_online")')" = "$2" ]; }
submit() { # port
    curl -sL -X POST "http://127.0.0.1:$1/v1/jobs" -H 'content-type: application/json' \
        -d '{"prompt":"compose ha test","model":"sd15","size":"64x64","steps":4}' | json 'd["id"]'
}
succeeded() { # port ids...
    local port=$1; shift
    for id in "$@"; do [ "$(curl -sL "http://127.0.0.1:$port/v1/jobs/$id" | json 'd["state"]')" = succeeded ] || return 1; done
}

$COMPOSE up -d
wait_for 60 "a leader" leader
first=$(leader)
port=${PORTS[$((first - 1))]}
follower_port=${PORTS[$((first % 3))]}
wait_for 60 "three nodes online" online "$port" 3
# Through a follower: 307 to the leader, followed.
code=$(curl -sL -o /tmp/drover-compose-ha.png -w '%{http_code}' -X POST "http://127.0.0.1:$follower_port/v1/generate" \
    -H 'content-type: application/json' -d '{"prompt":"a lighthouse","model":"sd15","steps":1}')
[ "$code" = 200 ] || fail "generate through a follower answered $code"
echo "compose ha: replica $first leads; an image through a follower ($(stat -c %s /tmp/drover-compose-ha.png) bytes)"

# kill -9 the leader's container with jobs queued and running.
ids=(); for _ in $(seq 12); do ids+=("$(submit "$port")"); done
start=$(date +%s.%N)
$COMPOSE kill -s SIGKILL "coordinator-$first"
wait_for 30 "a new leader" not_leader "$first"
next=$(leader)
next_port=${PORTS[$((next - 1))]}
wait_for 30 "the new leader takes a job" submit "$next_port"
took=$(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')")
echo "compose ha: leader $first killed -> replica $next leads, first 2xx ${took}s after the kill"
wait_for 90 "every accepted job to succeed" succeeded "$next_port" "${ids[@]}"
$COMPOSE start "coordinator-$first"
wait_for 60 "the old leader follows" sh -c "curl -s http://127.0.0.1:$port/v1/cluster | python3 -c 'import json,sys; d=json.load(sys.stdin); exit(0 if d[\"replica_id\"]==$first and d[\"leader_id\"]==$next else 1)'"
# It holds the jobs it missed: a follower answers finished jobs from its own store.
wait_for 60 "the old leader to hold every job" succeeded "$port" "${ids[@]}"
echo "compose ha: ${#ids[@]} jobs succeeded across the fail-over; the old leader caught up"
echo "compose ha test passed"
