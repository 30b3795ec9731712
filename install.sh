#!/usr/bin/env bash
# Installs everything Keg needs on a fresh Debian machine: system packages, then Keg
# itself into ./.venv. Run as root (or with sudo available). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

# git: the store's format and git http-backend; etcd: the benchmark anchor; nginx: FastCGI front end;
# skopeo, umoci: check exported OCI images; casync, restic, ostree: the large-value benchmark anchors;
# runc, busybox-static: the Mayor's containers and the image their tests run; tini: the init inside every container; debootstrap: the Debian base image of builds; iproute2: the network namespaces of the
# multi-machine tests; chromium, chromium-driver: the web UI's browser tests; fuse, libfuse2: fusermount and the
# libfuse.so.2 that fusepy (a test dependency in pyproject.toml) loads, for tests/lazyfs.py, the file system
# that drops unsynced writes in the power-loss tests (tests/test_raft_powerloss.py); jq: the operations docs' commands.
SYSTEM_PACKAGES=(git etcd-server etcd-client nginx python3-venv skopeo umoci casync restic ostree runc tini busybox-static debootstrap iproute2 iptables chromium chromium-driver fuse libfuse2 jq)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: installing system packages: ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv"
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

# The packages of the Debian base image builds run on, downloaded once so that `keg image bootstrap debian
# --tarball` and the tests bootstrap it offline (tests never reach the internet). From the mirror apt uses.
DEBIAN_TARBALL=/var/cache/keg/debian-bookworm.tgz
if [ ! -f "$DEBIAN_TARBALL" ]; then
    mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 || true)
    [ -n "$mirror" ] || mirror=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\/debian\)[[:space:]]\+bookworm[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n 1 || true)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    scratch=$(mktemp -d)
    echo "install.sh: downloading the Debian base image's packages from $mirror into $DEBIAN_TARBALL (debootstrap --make-tarball)"
    as_root mkdir -p "$(dirname "$DEBIAN_TARBALL")"
    as_root debootstrap --make-tarball="$DEBIAN_TARBALL.partial" --variant=minbase --include=python3,python3-pip \
        bookworm "$scratch" "$mirror" > /tmp/keg-debootstrap.log 2>&1 \
        || { tail -n 20 /tmp/keg-debootstrap.log; echo "install.sh: debootstrap failed; its log is /tmp/keg-debootstrap.log"; exit 1; }
    as_root mv "$DEBIAN_TARBALL.partial" "$DEBIAN_TARBALL"
    as_root rm -rf "$scratch"
fi
echo "install.sh: done; the keg command is .venv/bin/keg"
