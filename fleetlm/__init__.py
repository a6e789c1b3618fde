"""fleetlm: a Ray-based distributed LLM serving cluster.

The public names are imported lazily so that torch-free parts (the scheduler, the configs)
can be imported without loading torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "fleetlm.executor.llm",
    "SamplingParams": "fleetlm.executor.sampling_params",
    "AsyncEngine": "fleetlm.executor.async_engine",
    "EngineConfig": "fleetlm.executor.config",
    "RequestOutput": "fleetlm.executor.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fleetlm' has no attribute {name!r}")
