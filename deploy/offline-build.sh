#!/usr/bin/env bash
# Build Refrain's CPU image where no image registry and no package index can be reached from the
# build: the base image comes from debootstrap, the Python packages from a local wheelhouse.
#
#   deploy/offline-build.sh wheels        fill wheelhouse/ with every wheel the image installs
#                                         (on a machine that reaches PyPI, or a local mirror)
#   deploy/offline-build.sh base          make the base image (Debian bookworm, python3, venv)
#                                         with debootstrap from the host's own apt mirror (root)
#   deploy/offline-build.sh image         build the `cpu` target on that base from wheelhouse/
#   deploy/offline-build.sh all           the three in order
#
# Settings (environment): REFRAIN_BASE_IMAGE (refrain-base:bookworm), REFRAIN_IMAGE
# (refrain:cpu), REFRAIN_MIRROR (default: the first Debian mirror in the host's apt sources),
# PYTHON (python3, whose pip downloads the wheels), DOCKER_HOST as for docker itself.
# The wheels must suit the image: Linux x86_64 and CPython 3.11, Debian bookworm's. Elsewhere,
# give pip download's platform flags in REFRAIN_PIP_DOWNLOAD_ARGS, for example
# "--only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11".
# deploy/README.md ("Air-gapped builds") walks through a transfer.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELS="$ROOT/wheelhouse"
BASE_IMAGE=${REFRAIN_BASE_IMAGE:-refrain-base:bookworm}
IMAGE=${REFRAIN_IMAGE:-refrain:cpu}
SUITE=bookworm
PYTHON=${PYTHON:-python3}
PYMILVUS=$(sed -n '/^ARG PYMILVUS=/{s///p;q}' "$ROOT/Dockerfile")

say() { printf '[offline-build] %s\n' "$*" >&2; }

requirements() {
    # the image's requirements: pyproject.toml's dependencies, the build tools, and pymilvus
    "$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(["pip>=24", "setuptools>=77", "wheel>=0.42", *deps]))
EOF
    echo "$PYMILVUS"
}

wheels() {
    mkdir -p "$WHEELS"
    say "downloading wheels into $WHEELS"
    # shellcheck disable=SC2086  # REFRAIN_PIP_DOWNLOAD_ARGS is a list of flags
    "$PYTHON" -m pip download --quiet --dest "$WHEELS" ${REFRAIN_PIP_DOWNLOAD_ARGS:-} \
        -r <(requirements)
    local count
    count=$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)
    say "$count wheels, $(du -sh "$WHEELS" | cut -f1)"
}

mirror() {
    # the host's Debian mirror: deb822 sources first, then the one-line format
    if [ -n "${REFRAIN_MIRROR:-}" ]; then echo "$REFRAIN_MIRROR"; return; fi
    local url
    url=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ {print $2}' | grep -v -- '-security' | head -n 1 || true)
    if [ -z "$url" ]; then
        url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" && $3 !~ /security/ {print $2}' | head -n 1 || true)
    fi
    [ -n "$url" ] || { say "no Debian mirror in the apt sources; set REFRAIN_MIRROR"; exit 2; }
    echo "$url"
}

base() {
    command -v debootstrap > /dev/null || { say "debootstrap is not installed"; exit 2; }
    local rootfs
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' RETURN
    say "debootstrap $SUITE from $(mirror) (minbase, python3, python3-venv, libgomp1)"
    debootstrap --variant=minbase --include=python3,python3-venv,libgomp1,ca-certificates \
        "$SUITE" "$rootfs" "$(mirror)" > "$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" > /dev/null
    say "base image $BASE_IMAGE"
}

image() {
    # -print -quit, not a pipe into grep -q: under pipefail, grep leaving early can kill find
    # with SIGPIPE and fail the test on a full wheelhouse
    [ -n "$(find "$WHEELS" -maxdepth 1 -name '*.whl' -print -quit 2>/dev/null)" ] \
        || { say "wheelhouse/ is empty: run '$0 wheels' first"; exit 2; }
    say "building $IMAGE on $BASE_IMAGE from wheelhouse/ (no network in the build)"
    DOCKER_BUILDKIT=0 docker build --network none --target cpu \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" "$ROOT"
    say "$IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE") bytes"
}

case "${1:-}" in
    wheels) wheels ;;
    base) base ;;
    image) image ;;
    all) wheels; base; image ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
