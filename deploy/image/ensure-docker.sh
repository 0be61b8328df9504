#!/bin/sh
# Make `docker info` answer. Where no Docker engine runs and we are root, install
# Debian's docker.io (apt-get) and start dockerd with the vfs storage driver in the
# background (vfs works inside containers and VMs where overlayfs cannot be mounted).
#
#   deploy/image/ensure-docker.sh
#
# DOCKERD_LOG: where dockerd writes (default /var/log/checkout-sidecar-dockerd.log).
# DOCKERD_WAIT: seconds to wait for the engine to answer (default 120).
set -eu

log=${DOCKERD_LOG:-/var/log/checkout-sidecar-dockerd.log}
wait_for=${DOCKERD_WAIT:-120}

say() { echo "ensure-docker: $*" >&2; }

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "no Docker engine answers and this is not root: start Docker (or run as root)"
    exit 1
fi
if ! command -v dockerd >/dev/null 2>&1; then
    say "installing Debian's docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends docker.io iptables >&2
fi
if ! pgrep -x dockerd >/dev/null 2>&1; then
    say "starting dockerd --storage-driver=vfs (log: $log)"
    mkdir -p "$(dirname "$log")"
    # setsid + nohup: the engine outlives the make or pytest that started it
    setsid nohup dockerd --storage-driver=vfs >>"$log" 2>&1 </dev/null &
fi
elapsed=0
until docker info >/dev/null 2>&1; do
    if [ "$elapsed" -ge "$wait_for" ]; then
        say "dockerd did not answer within ${wait_for}s; last lines of $log:"
        tail -n 20 "$log" >&2 || true
        exit 1
    fi
    sleep 1
    elapsed=$((elapsed + 1))
done
say "Docker engine $(docker info --format '{{.ServerVersion}}' 2>/dev/null) is up"
