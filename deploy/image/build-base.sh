#!/bin/sh
# Print the base image for the Dockerfile's PYTHON_IMAGE on stdout (all else on stderr).
#
#   base=$(deploy/image/build-base.sh) && docker build --build-arg PYTHON_IMAGE=$base .
#
# python:3.11-slim-bookworm when it is present or can be pulled. Where it cannot
# (no Docker Hub), a base with the same Python is made from Debian's packages:
# debootstrap bookworm with python3 and python3-venv, a `python` link, this machine's
# CA bundle (PIP_CERT points at it, so pip reaches the package index through a
# TLS-inspecting proxy too) and this machine's pip configuration (/etc/pip.conf,
# /etc/xdg/pip, ~/.config/pip, ~/.pip and the PIP_* variables, since the index may be a
# mirror set there), then `docker import`. The result is cached by a tag that hashes
# those inputs, so the next run skips debootstrap.
#
# PYTHON_IMAGE_UPSTREAM: the image tried first (default python:3.11-slim-bookworm).
# DEBIAN_MIRROR: where debootstrap downloads (default http://deb.debian.org/debian).
# BASE_REBUILD=1: build the Debian base even if a cached one exists.
set -eu

upstream=${PYTHON_IMAGE_UPSTREAM:-python:3.11-slim-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
ca_bundle=/etc/ssl/certs/ca-certificates.crt
repository=checkout-sidecar-base

say() { echo "build-base: $*" >&2; }

if docker image inspect "$upstream" >/dev/null 2>&1; then
    echo "$upstream"
    exit 0
fi
if timeout "${PULL_TIMEOUT:-300}" docker pull --quiet "$upstream" >/dev/null 2>&1; then
    say "pulled $upstream"
    echo "$upstream"
    exit 0
fi
say "$upstream cannot be pulled; using a base made from Debian $suite packages"

# the host's pip configuration: files and directories copied to the same place in the
# image (the user's own go to root's home, who runs the build's pip)
home=${HOME:-/root}
pip_paths=""
for path in /etc/pip.conf /etc/xdg/pip "$home/.config/pip" "$home/.pip"; do
    [ -e "$path" ] && pip_paths="$pip_paths $path"
done
pip_env=$(env | grep '^PIP_[A-Z_]*=' | sort || true)

# the cache tag: a hash of everything the base is made from
inputs_hash=$(
    {
        cat "$0"
        echo "$upstream $mirror $suite"
        cat "$ca_bundle" 2>/dev/null || true
        for path in $pip_paths; do
            echo "== $path"
            find "$path" -type f | sort | xargs cat
        done
        echo "$pip_env"
    } | sha256sum | cut -c1-16
)
tag="$repository:$suite-$inputs_hash"

# one debootstrap at a time on this machine (make image and the test may overlap)
exec 9>"${TMPDIR:-/tmp}/checkout-sidecar-base.lock"
flock 9

if [ "${BASE_REBUILD:-0}" != 1 ] && docker image inspect "$tag" >/dev/null 2>&1; then
    say "cached $tag"
    echo "$tag"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    say "debootstrap needs root; run as root, or make $upstream available to Docker"
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing Debian's debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends debootstrap >&2
fi
if [ ! -r "$ca_bundle" ]; then
    say "no CA bundle at $ca_bundle: pip in the image could not verify the index"
    exit 1
fi

root=$(mktemp -d "${TMPDIR:-/var/tmp}/checkout-sidecar-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root" # mktemp's 0700 would become the image's / and lock out non-root users
started=$(date +%s)
say "debootstrap $suite from $mirror into $root"
debootstrap --variant=minbase --include=python3,python3-venv \
    "$suite" "$root" "$mirror" >&2

ln -sf python3 "$root/usr/bin/python"
mkdir -p "$root/etc/ssl/certs"
cp "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
for path in $pip_paths; do
    case "$path" in
    "$home"/*) target="/root/${path#"$home"/}" ;;
    *) target=$path ;;
    esac
    mkdir -p "$root$(dirname "$target")"
    cp -a "$path" "$root$target"
done
# what a base image does not need: downloaded packages, indexes, docs
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*

# the image's environment: what python:3.11-slim sets, and pip's certificate and config
set -- \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change 'CMD ["python3"]'
if [ -n "$pip_env" ]; then
    while IFS= read -r line; do
        name=${line%%=*}
        [ "$name" = PIP_CERT ] && continue
        set -- "$@" --change "ENV $name=\"${line#*=}\""
    done <<EOF_ENV
$pip_env
EOF_ENV
fi
tar --numeric-owner -C "$root" -c . | docker import "$@" - "$tag" >/dev/null
say "built $tag in $(($(date +%s) - started))s"
echo "$tag"
