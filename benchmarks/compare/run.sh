#!/usr/bin/env bash
# Side-by-side benchmark of fleetlm, vLLM's CPU build and llama.cpp (see README.md here).
# Runs in the project's .venv (set up by scripts/setup.sh); arguments pass through.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$root/scripts/setup.sh"
cd "$root"
exec python -m benchmarks.compare.compare "$@"
