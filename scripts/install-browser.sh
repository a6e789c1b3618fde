#!/usr/bin/env bash
# Install Debian's chromium for the web-page tests (Playwright drives it; it never downloads
# its own browser). Idempotent: does nothing when the browser is already there. Needs root for
# apt-get; without root it says what to run and exits non-zero so the caller can skip.
set -euo pipefail
browser="${FLEETLM_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$browser" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser: $browser is missing; run as root: apt-get install -y chromium" >&2
    exit 1
fi
echo "install-browser: installing Debian's chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
if [ ! -x "$browser" ]; then
    echo "install-browser: apt-get finished but $browser is still missing" >&2
    exit 1
fi
