#!/usr/bin/env bash
# Builds the drover-coordinator and drover-node images with no image pulls: the binaries are built
# here with the release profile, stripped, and copied with the shared libraries `ldd` lists into a
# scratch image.
#   drover-coordinator:local  /bin/drover-coordinator, /bin/drover (CLI, used for health checks),
#                             /data (the sled volume's mount point, owned by uid 10001)
#   drover-node:local         /bin/drover-node, /models and /loras mount points
# Usage: scripts/docker-build.sh            (needs cargo and a Docker engine)
set -euo pipefail
cd "$(dirname "$0")/.."
# Release profile: the images run the binaries a deployment runs (the dev profile optimises only
# the dependencies, leaving Drover's own code, the coordinator's hot paths and the node's pipeline
# glue, unoptimised). It costs a second, full optimised build of the workspace in target/release
# (several minutes from clean, and its own gigabytes of target/) next to the dev one the tests use.
cargo build --release --bin drover-coordinator --bin drover --bin drover-node
bin_dir=target/release
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
rootfs node drover-node
mkdir -p "$work/rootfs-node/models" "$work/rootfs-node/loras"

docker build -q -f docker/Dockerfile --build-arg ROOTFS=rootfs-coordinator -t drover-coordinator:local "$work"
docker build -q -f docker/Dockerfile --build-arg ROOTFS=rootfs-node -t drover-node:local "$work"
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^drover-(coordinator|node):local'
