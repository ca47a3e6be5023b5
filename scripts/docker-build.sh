#!/usr/bin/env bash
# Builds the drover-coordinator and drover-node images with no image pulls: the binaries are built
# here with the release profile, stripped, and copied with the shared libraries `ldd` lists into a
# scratch image.
#   drover-coordinator:local  /bin/drover-coordinator, /bin/drover (CLI, used for health checks),
#                             /data (the sled volume's mount point, owned by uid 10001)
#   drover-node:local         /bin/drover-node, /bin/drover (CLI: the drain of a preStop hook),
#                             /models and /loras mount points
# Usage: scripts/docker-build.sh            (needs cargo and a Docker engine)
#        DROVER_DOCKER_PROFILE=dev scripts/docker-build.sh   (reuse the test build, see below)
set -euo pipefail
cd "$(dirname "$0")/.."
# Release profile by default: the images run the binaries a deployment runs (the dev profile
# optimises only the dependencies, leaving Drover's own code, the coordinator's hot paths and the
# node's pipeline glue, unoptimised). That costs a second, full optimised build of the workspace in
# target/release (15-20 minutes from clean on 2 cores) next to the dev one the tests use, so the
# compose fault test, which checks wiring and recovery rather than speed, builds with `dev`.
profile=${DROVER_DOCKER_PROFILE:-release}
case "$profile" in
    release) bin_dir=target/release ;;
    dev) bin_dir=target/debug ;;
    *) echo "DROVER_DOCKER_PROFILE=$profile: expected release or dev" >&2; exit 2 ;;
esac
cargo build --profile "$profile" --bin drover-coordinator --bin drover --bin drover-node
work=docker/build
rm -rf "$work" && mkdir -p "$work"

rootfs() { # image-name binaries...
    local root="$work/rootfs-$1"; shift
    mkdir -p "$root/bin" "$root/tmp"
    for bin in "$@"; do
        strip -o "$root/bin/$bin" "$bin_dir/$bin"
        for lib in $(ldd "$bin_dir/$bin" | grep -o '/[^ ]*\.so[^ ]*'); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
    chmod 1777 "$root/tmp"
}
rootfs coordinator drover-coordinator drover
mkdir -p "$work/rootfs-coordinator/data"
rootfs node drover-node drover
mkdir -p "$work/rootfs-node/models" "$work/rootfs-node/loras"

docker build -q -f docker/Dockerfile --build-arg ROOTFS=rootfs-coordinator -t drover-coordinator:local "$work"
docker build -q -f docker/Dockerfile --build-arg ROOTFS=rootfs-node -t drover-node:local "$work"
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^drover-(coordinator|node):local'
