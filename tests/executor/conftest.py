"""Fixtures shared by the greedy-equality tests (tests/executor/greedy_scenario.py)."""

from __future__ import annotations

import pytest
from greedy_scenario import ENGINE_ARGS, check_exercised, run

from fleetlm import LLM
from fleetlm.executor.weights import resolve_model


@pytest.fixture(scope="module")
def builtin_dir():
    return str(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def reference(builtin_dir):
    """The greedy scenario on one plain in-process engine: what every variant must equal."""
    with LLM(builtin_dir, **ENGINE_ARGS) as llm:
        result = run(llm)
    check_exercised(result)
    return result
