"""Fixtures of the multi-host tests: two network namespaces joined by a veth pair, and a
two-node Ray cluster in them (head in one, worker node in the other). One cluster per test
session: starting it costs tens of seconds on 2 cores.

Independent of the session's own Ray cluster on 127.0.0.1 (`tests/conftest.py`): other
namespaces, other ports, another temp dir and auth token, and teardown that signals only
processes inside our namespaces."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_cluster import MultihostSetupError, RayNodes, TwoNodeNetwork

CPUS_PER_NODE = 2  # logical: a SPREAD group of 3 one-CPU workers fits as 2 + 1


@contextlib.contextmanager
def _failing_clearly() -> Iterator[None]:
    """A set-up or teardown error fails the test with its own message, not a traceback."""
    try:
        yield
    except MultihostSetupError as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None


@pytest.fixture(scope="session")
def two_node_network() -> Iterator[TwoNodeNetwork]:
    with _failing_clearly(), TwoNodeNetwork.create() as net:
        yield net


@pytest.fixture(scope="session")
def ray_two_nodes(two_node_network: TwoNodeNetwork) -> Iterator[RayNodes]:
    # Short: Ray's unix socket paths under it must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="fleetlm-mh-", dir="/tmp"))
    base_env = dict(os.environ)
    # Every node resolves the built-in model itself: point all of them at one cache.
    base_env.setdefault("FLEETLM_CACHE_DIR", str(Path.home() / ".cache" / "fleetlm"))
    try:
        with _failing_clearly(), RayNodes(two_node_network, temp_dir, CPUS_PER_NODE,
                                          base_env=base_env) as nodes:
            yield nodes
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
