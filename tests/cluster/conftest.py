"""One Serve HTTP proxy for the whole test session, on the session's Ray cluster
(tests/conftest.py). Applications deployed by the tests share the proxy under their own route
prefixes. The fake engine module is pickled by value, since Ray workers cannot import the
tests folder.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import fake_engine  # noqa: E402  (a sibling module; pytest puts this folder on sys.path)

from fleetlm.cluster.config import ClusterConfig  # noqa: E402

TEST_REPLICA_CPUS = 0.1
WAIT_TIMEOUT_S = 60.0


def wait_until(condition, what: str, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(ray_cluster) -> None:
    """The session's cluster, with the fake engine module pickled by value."""
    import ray

    ray.cloudpickle.register_pickle_by_value(fake_engine)


@pytest.fixture(scope="session")
def http_port(ray_cluster) -> int:
    """The port of Serve's proxy, started once; every test app lives under it."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def small_config(base: ClusterConfig | None = None, **sections) -> ClusterConfig:
    """`base` (default: all defaults) sized for 2 CPU cores, with `sections` merged in.

    Fractional CPUs for the ingress and every replica (Ray then gives each one math thread).
    """
    data = (base or ClusterConfig()).model_dump()
    data["replicas"].update(num_cpus=TEST_REPLICA_CPUS, num_threads=None, max_ongoing_requests=256)
    data["http"].update(ingress_num_cpus=TEST_REPLICA_CPUS)
    for name, values in sections.items():
        data[name].update(values)
    return ClusterConfig.model_validate(data)
