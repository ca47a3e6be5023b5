# Shared by the compose tests (sourced): build the images from the test build, tear the cluster
# down on exit (its logs first when the test failed), and the helpers they poll with. The caller
# sets COMPOSE (the docker-compose command with its file) and NAME (how failures are prefixed).

# The dev profile reuses the binaries `cargo test` built (see docker-build.sh); set
# DROVER_DOCKER_PROFILE=release to test the deployment build instead.
DROVER_DOCKER_PROFILE=${DROVER_DOCKER_PROFILE:-dev} scripts/docker-build.sh
cleanup() {
    local rc=$?
    if [ $rc -ne 0 ]; then $COMPOSE logs --tail 40 || true; fi
    $COMPOSE down -v >/dev/null 2>&1 || true
    exit $rc
}
trap cleanup EXIT

fail() { echo "$NAME: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
wait_for() { # seconds description command...
    local limit=$1 what=$2; shift 2
    for _ in $(seq $((limit * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    fail "timed out after ${limit}s waiting for $what"
}
