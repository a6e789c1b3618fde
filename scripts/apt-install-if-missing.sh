#!/usr/bin/env bash
# apt-install-if-missing.sh WHAT PACKAGE...: install Debian PACKAGEs unless WHAT (a command or
# a path) is already there. Idempotent. Needs root for apt-get; without root it says what to
# run and exits non-zero, so the caller can carry on and the tests that need WHAT say so.
set -euo pipefail
what="$1"; shift
if command -v "$what" >/dev/null 2>&1 || [ -x "$what" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "$(basename "$0"): $what is missing; run as root: apt-get install -y $*" >&2
    exit 1
fi
echo "$(basename "$0"): installing Debian's $*"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "$@"
if ! command -v "$what" >/dev/null 2>&1 && [ ! -x "$what" ]; then
    echo "$(basename "$0"): apt-get finished but $what is still missing" >&2
    exit 1
fi
