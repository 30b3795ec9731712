#!/usr/bin/env bash
# Installs everything Keg needs on a fresh Debian machine: system packages, then Keg
# itself into ./.venv. Run as root (or with sudo available). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

# git: the store's format and git http-backend; etcd: the benchmark anchor; nginx: FastCGI front end;
# skopeo, umoci: check exported OCI images; casync, restic, ostree: the large-value benchmark anchors;
# runc, busybox-static: the Mayor's containers and the image their tests run; iproute2: the network namespaces of the
# multi-machine tests; chromium, chromium-driver: the web UI's browser tests.
SYSTEM_PACKAGES=(git etcd-server etcd-client nginx python3-venv skopeo umoci casync restic ostree runc busybox-static iproute2 chromium chromium-driver)

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
echo "install.sh: done; the keg command is .venv/bin/keg"
