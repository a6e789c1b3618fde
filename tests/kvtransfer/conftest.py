"""After every test of a module with P/D `engines`: both sides settled (pd_helpers.settle)."""

from __future__ import annotations

import pytest
from pd_helpers import settle


@pytest.fixture(autouse=True)
def settled(request):
    yield
    if "engines" in request.fixturenames:
        for llm in request.getfixturevalue("engines").values():
            settle(llm)
