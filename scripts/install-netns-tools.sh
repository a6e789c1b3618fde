#!/usr/bin/env bash
# Install Debian's iproute2 (`ip netns`, veth) for the multi-host tests, which run a Ray node in
# each of two network namespaces. Idempotent: does nothing when `ip` is there. Needs root for
# apt-get; without root it says what to run and exits non-zero (the tests then say so too).
set -euo pipefail
if command -v ip >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-netns-tools: ip is missing; run as root: apt-get install -y iproute2" >&2
    exit 1
fi
echo "install-netns-tools: installing Debian's iproute2"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends iproute2
