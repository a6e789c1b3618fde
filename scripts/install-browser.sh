#!/usr/bin/env bash
# Install Debian's chromium for the web-page tests (Playwright drives it; it never downloads
# its own browser). Does nothing when the browser is already there.
set -euo pipefail
exec "$(dirname "$0")/apt-install-if-missing.sh" "${FLEETLM_CHROMIUM:-/usr/bin/chromium}" \
    chromium fonts-dejavu-core
