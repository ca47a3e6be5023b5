#!/usr/bin/env bash
# Runs schemathesis (https://schemathesis.io) against a live local coordinator with three
# simulated nodes (sd15, sd2, sdxl; 1 ms steps, up to 1024² pixels), over every operation of its
# /openapi.json, with the conformance checks on: no 5xx, every status documented, every content
# type documented, every body (and each server-sent event) matching its schema, every documented
# header matching its schema. Phases: examples, coverage, fuzzing, stateful (the links from a
# submission to its job's operations). Prints the figures; exits non-zero on any failure.
#
# Two passes. The coordinator has an admin token: the first pass, over every operation, calls
# as a client without it (admin calls answer 401; were it to drain the only node of a family,
# learning node ids from `GET /v1/nodes`, jobs of that family would wait, by design, past any
# request timeout). The second pass calls the node operations with the token.
#
# Needs Python 3 and PyPI (schemathesis goes into target/schemathesis-venv); not run by CI.
# Settings: ST_VERSION (schemathesis version), ST_MAX_EXAMPLES (cases per operation and phase),
# ST_SEED, ST_WORKERS, PYTHON (for the venv), DROVER_HTTP_PORT / DROVER_GRPC_PORT (4290 / 4291).
# Extra arguments go to `st run`; the JUnit report goes to target/schemathesis-report/.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION="${ST_VERSION:-4.32.5}"
ST_MAX_EXAMPLES="${ST_MAX_EXAMPLES:-100}"
ST_SEED="${ST_SEED:-1}"
# One worker: hypothesis compiles lambdas' sources while reporting, which CPython 3.11 can fail
# at from several threads at once ("AST constructor recursion depth mismatch").
ST_WORKERS="${ST_WORKERS:-1}"
PYTHON="${PYTHON:-python3}"
HTTP_PORT="${DROVER_HTTP_PORT:-4290}"
GRPC_PORT="${DROVER_GRPC_PORT:-4291}"
ADMIN_TOKEN="schemathesis-admin-token"
VENV=target/schemathesis-venv
BASE="http://127.0.0.1:$HTTP_PORT"

cargo build -p drover-coordinator -p drover-tests --bins

if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "version $ST_VERSION\$"; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "schemathesis==$ST_VERSION"
fi

DIR="$(mktemp -d)"
pids=()
status=1
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "$status" -eq 0 ]; then rm -rf "$DIR"; else echo "logs kept in $DIR"; fi
}
trap cleanup EXIT INT TERM

DROVER_HTTP_ADDR="127.0.0.1:$HTTP_PORT" DROVER_GRPC_ADDR="127.0.0.1:$GRPC_PORT" \
DROVER_DATA_DIR="$DIR/data" DROVER_HEARTBEAT_MS=200 DROVER_QUEUE_LIMIT=512 RUST_LOG=warn \
DROVER_ADMIN_TOKEN="$ADMIN_TOKEN" \
    target/debug/sandbox-coordinator >"$DIR/coordinator.log" 2>&1 &
pids+=($!)

for family in sd15 sd2 sdxl; do
    COORDINATOR_URL="http://127.0.0.1:$GRPC_PORT" NODE_NAME="sim-$family" BACKEND=sim \
    SIM_FAMILY="$family" SIM_STEP_MS=1 NUM_WORKERS=8 MAX_PIXELS=1048576 RUST_LOG=warn \
        target/debug/sandbox-node >"$DIR/$family.log" 2>&1 &
    pids+=($!)
done

online=0
for _ in $(seq 300); do
    online="$(curl -fsS "$BASE/v1/nodes" 2>/dev/null | grep -o '"state":"online"' | wc -l || true)"
    if [ "$online" -ge 3 ]; then break; fi
    sleep 0.1
done
if [ "$online" -lt 3 ]; then
    echo "the nodes did not come online:" >&2
    tail -n 20 "$DIR"/*.log >&2
    exit 1
fi

# From a file, so that `GET /openapi.json` is tested too (the CLI skips the schema's own URL).
curl -fsS "$BASE/openapi.json" >"$DIR/openapi.json"
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance
CHECKS="$CHECKS,response_schema_conformance,response_headers_conformance"

st_run() { # log, then arguments
    local log="$1"
    shift
    SCHEMATHESIS_HOOKS=scripts/schemathesis_hooks.py \
        "$VENV/bin/st" run "$DIR/openapi.json" --url "$BASE" --checks "$CHECKS" \
        --max-examples "$ST_MAX_EXAMPLES" --seed "$ST_SEED" \
        --request-timeout 60 --workers "$ST_WORKERS" --no-color \
        --report junit --report-dir target/schemathesis-report "$@" | tee "$log"
    return "${PIPESTATUS[0]}"
}

set +e
st_run "$DIR/clients.log" --phases examples,coverage,fuzzing,stateful "$@"
clients=$?
st_run "$DIR/admin.log" --phases examples,coverage,fuzzing --include-path-regex '^/v1/nodes' \
    -H "Authorization: Bearer $ADMIN_TOKEN" "$@"
admin=$?
set -e
status=$((clients | admin))
if [ "$status" -ne 0 ]; then
    for what in v1/nodes v1/jobs metrics; do
        curl -sS "$BASE/$what" >"$DIR/after-${what//\//-}.txt" 2>&1 || true
    done
fi

echo
echo "schemathesis $("$VENV/bin/st" --version | awk '{print $NF}'); exit status: clients $clients, admin $admin"
for pass in clients admin; do
    echo "== $pass pass"
    sed -n '/= SUMMARY =/,$p' "$DIR/$pass.log" | grep -v "^ *$" || true
done
exit "$status"
