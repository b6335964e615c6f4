#!/usr/bin/env bash
# Builds kube-apiserver, etcd (versions pinned in go.mod) and helm (HELM_VERSION below) for the e2e tests
# into a cache directory, once per version of this script and go.mod.
#
#   KUBEBUILDER_ASSETS=/dir/with/both/binaries  -> use them, build nothing (the envtest convention).
#   MATVIEW_CONTROLPLANE_CACHE (default ~/.cache/matview-controlplane) -> where builds are kept.
#
# The first build downloads ~700 MB of Go modules and compiles for 3-6 minutes on 2 cores; it prints a
# progress line every 30 s. Concurrent runs wait on a lock instead of racing; an interrupted build
# leaves no partial directory and no compiler behind. Prints the binaries' directory on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" && -x "$KUBEBUILDER_ASSETS/helm" ]]; then
    echo "$KUBEBUILDER_ASSETS"
    exit 0
fi

HELM_VERSION=v3.22.0
version="$(cat "$here/go.mod" "$0" | sha256sum | cut -c1-12)"
cache="${MATVIEW_CONTROLPLANE_CACHE:-$HOME/.cache/matview-controlplane}"
out="$cache/$version"
ready() { [[ -x "$out/kube-apiserver" && -x "$out/etcd" && -x "$out/helm" ]]; }
if ready; then
    echo "$out"
    exit 0
fi

command -v go >/dev/null || { echo "build.sh: Go is not installed and KUBEBUILDER_ASSETS is not set" >&2; exit 3; }
mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    echo "build.sh: another build of the control plane is running; waiting for it" >&2
    flock 9
fi
if ready; then  # built by the run we waited for
    echo "$out"
    exit 0
fi

partial="$(mktemp -d "$out.partial.XXXXXX")"
kill_tree() {  # a process and everything it started (go runs the compilers as its children)
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
    kill -TERM "$1" 2>/dev/null || true
}
heartbeat=""
cleanup() {
    local child
    # KILL, not TERM: a TERM that reaches a subshell before it has reset the traps it inherited is lost
    [[ -z "$heartbeat" ]] || kill -KILL "$heartbeat" 2>/dev/null || true
    for child in $(pgrep -P $$ 2>/dev/null); do kill_tree "$child"; done  # go, if interrupted
    rm -rf "$partial"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for stale in "$out".partial.*; do  # left by a run killed with SIGKILL (we hold the lock: nobody else builds)
    [[ "$stale" != "$partial" ]] && rm -rf "$stale"
done

started=$SECONDS
# The heartbeat starts no process: `read -t` on a pipe that nobody writes to (we hold both of its ends) is a
# sleep. A `sleep` child could outlive the build when the heartbeat is killed while forking it.
(
    exec {never}<> <(:)
    while ! read -r -t 30 -u "$never"; do
        echo "build.sh: still building the control plane ($((SECONDS - started)) s)" >&2
    done
) &
heartbeat=$!
disown "$heartbeat"  # killed by cleanup: no "Killed" job notice
cd "$here"
# In the background and waited for: bash runs a trap at once during `wait`, but only after a foreground
# command ends, so an interrupt would otherwise wait for the whole compile.
run() { "$@" >&2 & wait $!; }
[[ -f go.sum ]] || run go mod tidy
echo "build.sh: building etcd (1/3); the first run downloads the Go modules" >&2
CGO_ENABLED=0 run go build -trimpath -ldflags="-s -w" -o "$partial/etcd" go.etcd.io/etcd/server/v3
echo "build.sh: building kube-apiserver (2/3) after $((SECONDS - started)) s" >&2
CGO_ENABLED=0 run go build -trimpath -ldflags="-s -w" -o "$partial/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
echo "build.sh: building helm $HELM_VERSION (3/3) after $((SECONDS - started)) s" >&2
GOBIN="$partial" run go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
rm -rf "$out" && mv "$partial" "$out"
echo "build.sh: built kube-apiserver, etcd and helm in $((SECONDS - started)) s" >&2
echo "$out"
