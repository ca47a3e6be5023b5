#!/usr/bin/env bash
# Renders deploy/k8s with `kubectl kustomize` and validates every object against the Kubernetes
# schemas, offline (the `kubernetes-validate` PyPI package carries them), strictly (unknown
# fields are errors). Run by .ci/run; installs what it lacks (kubectl from Debian, the
# validator from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${K8S_VERSION:-1.30.0}
if ! command -v kubectl >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client
fi
if ! command -v kubernetes-validate >/dev/null; then
    pip install -q kubernetes-validate 2>/dev/null || pip install -q --break-system-packages kubernetes-validate
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
kubectl kustomize deploy/k8s > "$out/drover.yaml"
kubernetes-validate -k "$version" --strict --quiet "$out/drover.yaml"
kinds=$(grep -c '^kind:' "$out/drover.yaml")
echo "k8s: deploy/k8s renders $kinds objects, valid against Kubernetes $version"
