"""Session-wide test setup: marker handling and the one Ray cluster of a test session."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    num_gpus = 0
    if _has_cuda():
        import torch

        num_gpus = torch.cuda.device_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    run_release = "release" in (config.getoption("markexpr") or "")
    skip_release = pytest.mark.skip(
        reason="a release check (minutes, outside CI's time budget): scripts/test -m release")
    for item in items:
        if "release" in item.keywords and not run_release:
            item.add_marker(skip_release)
        if "gpu" in item.keywords and num_gpus < 1:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and num_gpus < 2:
            item.add_marker(skip_multi)


NUM_CPUS = 2
OBJECT_STORE_BYTES = 128 * 1024 * 1024


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster on 127.0.0.1 for the whole session (started on first use)."""
    import ray

    from fleetlm.cluster.launcher import set_ray_env_defaults

    set_ray_env_defaults()  # the Ray settings `fleetlm serve` gives a cluster it starts
    ray.init(
        num_cpus=NUM_CPUS,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
    )
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()
