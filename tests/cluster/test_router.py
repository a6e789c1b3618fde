"""The routing pipeline: round-robin and least-loaded as configurations of one router."""

from __future__ import annotations

import pytest

from fleetlm.cluster.router import (
    ReplicaState,
    Router,
    RoutingRequest,
    build_router,
    kv_usage_scorer,
)
from fleetlm.executor.protocol import EngineStats

NAMES = ["r0", "r1", "r2"]
REQUEST = RoutingRequest("req")


def _picks(router: Router, num: int) -> list[str]:
    return [router.pick(REQUEST).name for _ in range(num)]


def test_round_robin_cycles():
    router = build_router("round_robin", NAMES)
    assert _picks(router, 7) == ["r0", "r1", "r2", "r0", "r1", "r2", "r0"]


def test_round_robin_ignores_load():
    router = build_router("round_robin", NAMES)
    router.on_start(router.replicas[0])
    router.on_start(router.replicas[0])
    assert _picks(router, 3) == ["r0", "r1", "r2"]


def test_least_loaded_follows_inflight_counts():
    router = build_router("least_loaded", NAMES)
    picked = []
    for _ in range(6):  # requests that never finish pile up evenly
        replica = router.pick(REQUEST)
        router.on_start(replica)
        picked.append(replica.name)
    assert sorted(picked) == ["r0", "r0", "r1", "r1", "r2", "r2"]
    router.on_finish(router.replicas[1])
    assert router.pick(REQUEST).name == "r1"


def test_least_loaded_counts_engine_waiting_queue():
    router = build_router("least_loaded", NAMES)
    router.update_stats(0, EngineStats(num_waiting=3))
    router.update_stats(2, EngineStats(num_waiting=1))
    assert router.pick(REQUEST).name == "r1"


def test_unhealthy_replicas_are_skipped_unless_all_are():
    router = build_router("round_robin", NAMES)
    router.update_stats(1, EngineStats(), is_healthy=False)
    assert _picks(router, 4) == ["r0", "r2", "r0", "r2"]
    for i in range(len(NAMES)):
        router.update_stats(i, EngineStats(), is_healthy=False)
    assert len(set(_picks(router, 3))) == 3  # a filter that empties the list is ignored


def test_weighted_scorers_combine():
    def prefer_r2(request, replicas):  # stands in for a prefix-match scorer
        return [1.0 if r.name == "r2" else 0.0 for r in replicas]

    router = Router(NAMES, scorers=[(prefer_r2, 0.5), (kv_usage_scorer, 1.0)])
    router.update_stats(2, EngineStats(kv_cache_usage=0.9))
    assert router.pick(REQUEST).name in {"r0", "r1"}  # 0.5 + 0.1 < 1.0
    router.update_stats(2, EngineStats(kv_cache_usage=0.2))
    assert router.pick(REQUEST).name == "r2"  # 0.5 + 0.8 > 1.0


def test_finish_without_start_is_a_bug():
    router = build_router("round_robin", NAMES)
    with pytest.raises(AssertionError):
        router.on_finish(router.replicas[0])


def test_unknown_policy_and_no_replicas_are_rejected():
    with pytest.raises(ValueError, match="prefix_aware"):
        build_router("prefix_aware", NAMES)
    with pytest.raises(ValueError, match="at least one replica"):
        build_router("round_robin", [])


def test_replica_state_defaults():
    state = ReplicaState(0, "r0")
    assert (state.num_inflight, state.is_healthy, state.stats) == (0, True, EngineStats())
