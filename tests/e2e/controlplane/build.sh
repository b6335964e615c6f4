#!/usr/bin/env bash
# Builds kube-apiserver and etcd for the e2e tests into a cache directory, once per pinned version.
#
#   KUBEBUILDER_ASSETS=/dir/with/both/binaries  -> use them, build nothing (the envtest convention).
#   MATVIEW_CONTROLPLANE_CACHE (default ~/.cache/matview-controlplane) -> where builds are kept.
#
# Prints the directory holding kube-apiserver and etcd on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" ]]; then
    echo "$KUBEBUILDER_ASSETS"
    exit 0
fi

version="$(sha256sum "$here/go.mod" | cut -c1-12)"
out="${MATVIEW_CONTROLPLANE_CACHE:-$HOME/.cache/matview-controlplane}/$version"
if [[ -x "$out/kube-apiserver" && -x "$out/etcd" ]]; then
    echo "$out"
    exit 0
fi

command -v go >/dev/null || { echo "build.sh: Go is not installed and KUBEBUILDER_ASSETS is not set" >&2; exit 3; }
mkdir -p "$out.partial"
cd "$here"
[[ -f go.sum ]] || go mod tidy >&2
started=$SECONDS
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$out.partial/etcd" go.etcd.io/etcd/server/v3 >&2
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$out.partial/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
rm -rf "$out" && mv "$out.partial" "$out"
echo "build.sh: built kube-apiserver and etcd in $((SECONDS - started)) s" >&2
echo "$out"
