#!/usr/bin/env bash
# Builds the repository's Dockerfile, unchanged, with buildah, into localhost/matview-operator:e2e.
#
# The Dockerfile starts FROM python:3.11-slim. Where Docker Hub is out of reach, that name is made here
# from Debian packages (mmdebstrap, then Containerfile.base) and kept; it is remade when this script or
# Containerfile.base change. Images live in their own storage (MATVIEW_IMAGE_STORAGE, default
# ~/.cache/matview-image), with the vfs driver, so nothing here touches the host's own images and no
# kernel overlay support is needed. Concurrent runs wait on a lock.
#
# First run: mmdebstrap ~20-40 s, the image build ~30-90 s (pip downloads the wheels). Prints the
# storage directory on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
storage="${MATVIEW_IMAGE_STORAGE:-$HOME/.cache/matview-image}"
mkdir -p "$storage"
exec 9>"$storage/.lock"
if ! flock -n 9; then
    echo "image/build.sh: another image build is running; waiting for it" >&2
    flock 9
fi
store=(--root "$storage/storage" --runroot "$storage/run" --storage-driver vfs)
base=docker.io/library/python:3.11-slim
recipe="$(cat "$0" "$here/Containerfile.base" | sha256sum | cut -c1-12)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
started=$SECONDS
made="$(buildah "${store[@]}" inspect --type image --format '{{index .OCIv1.Config.Labels "matview.dev/base-recipe"}}' "$base" 2>/dev/null || true)"
if [[ "$made" != "$recipe" ]]; then
    echo "image/build.sh: making $base from Debian bookworm packages (mmdebstrap)" >&2
    # Slimmed as Debian's -slim images (the official python:3.11-slim's base) are: no documentation,
    # manual pages or translations, so the image's size measures the Dockerfile's layers and not these.
    slim=()
    for path in '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*' \
        '/usr/share/groff/*' '/usr/share/lintian/*' '/usr/share/linda/*'; do
        slim+=("--dpkgopt=path-exclude=$path")
    done
    mmdebstrap --quiet --variant=minbase "${slim[@]}" --include=python3,python3-pip,passwd bookworm \
        "$work/minbase.tar" >&2
    podman "${store[@]}" import --quiet "$work/minbase.tar" localhost/matview-debian-minbase:bookworm >&2
    cp /etc/ssl/certs/ca-certificates.crt "$work/"
    buildah "${store[@]}" bud --quiet --isolation chroot --pull-never --layers=false \
        --label "matview.dev/base-recipe=$recipe" -f "$here/Containerfile.base" -t "$base" "$work" >&2
    echo "image/build.sh: base made in $((SECONDS - started)) s" >&2
fi
echo "image/build.sh: building the Dockerfile" >&2
buildah "${store[@]}" bud --quiet --isolation chroot --pull-never -t localhost/matview-operator:e2e "$root" >&2
echo "image/build.sh: image built in $((SECONDS - started)) s" >&2
echo "$storage"
