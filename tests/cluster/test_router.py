"""The routing pipeline: round-robin, least-loaded and the prefix-aware policies (precise from
KV events, approximate from the router's history) as configurations of one router."""

from __future__ import annotations

import logging

import pytest

from fleetlm.cluster.config import RouterSection
from fleetlm.cluster.kv_index import hash_prompt_blocks
from fleetlm.cluster.metrics import render_metrics
from fleetlm.cluster.router import (
    HistoryMatcher,
    ReplicaState,
    Router,
    RoutingRequest,
    build_router,
    kv_usage_scorer,
)
from fleetlm.executor.kv_cache_manager import KVCacheManager
from fleetlm.executor.kv_events import KVEventBuffer
from fleetlm.executor.protocol import EngineStats
from fleetlm.executor.request import Request
from fleetlm.executor.sampling_params import SamplingParams

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


def test_a_replica_load_counts_each_request_once():
    """This ingress's in-flight requests are among those its engine reports running or
    waiting: the larger of the two counts is the load, not their sum."""
    router = build_router(RouterSection(policy="precise_prefix", saturation_threshold=5), NAMES)
    _cache_on(router, "r1", TENANT_A)
    for _ in range(4):
        router.on_start(router.replica("r1"))
    router.update_stats(1, EngineStats(num_running=2, num_waiting=2))  # those same four
    assert router.pick(_prefix_request("a", TENANT_A)).name == "r1"  # 4 < 5: not saturated
    router.update_stats(1, EngineStats(num_running=2, num_waiting=3))  # another ingress's too
    assert router.pick(_prefix_request("b", TENANT_A)).name != "r1"


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
        build_router("round_robin", []).pick(REQUEST)  # Serve has told it of none yet


def test_replica_state_defaults():
    state = ReplicaState(0, "r0")
    assert (state.num_inflight, state.is_healthy, state.stats) == (0, True, EngineStats())


# ---- prefix-aware policies --------------------------------------------------------------------
BLOCK = 4
TENANT_A = list(range(100, 112))  # three blocks
TENANT_B = list(range(200, 212))


def _prefix_request(request_id: str, tokens: list[int]) -> RoutingRequest:
    return RoutingRequest(request_id, block_hashes=tuple(hash_prompt_blocks(tokens, BLOCK)))


def _cache_on(router: Router, replica: str, tokens: list[int]) -> None:
    """A real block pool caches `tokens`; its KV events reach the router's index."""
    buffer = KVEventBuffer()
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK, kv_events=buffer)
    manager.allocate_slots(Request("r", tokens, SamplingParams()), len(tokens))
    buffer.end_step()
    router.kv_index.apply(replica, buffer.since(None, 0))


def _start(router: Router, request: RoutingRequest) -> str:
    replica = router.pick(request)
    router.on_start(replica)
    return replica.name


def test_precise_prefix_sticks_until_the_replica_saturates_then_spills():
    section = RouterSection(policy="precise_prefix", saturation_threshold=2)
    router = build_router(section, NAMES)
    _cache_on(router, "r1", TENANT_A)
    same_tenant = [_prefix_request(f"a{i}", TENANT_A + [i] * BLOCK) for i in range(4)]
    assert [_start(router, same_tenant[i]) for i in range(2)] == ["r1", "r1"]
    spilled = _start(router, same_tenant[2])  # r1 has 2 in flight: saturated
    assert spilled != "r1"
    # The spill target is computing the prefix now: the tenant's next request follows it.
    assert _start(router, same_tenant[3]) == spilled
    router.on_finish(router.replicas[1])
    assert router.pick(same_tenant[0]).name == "r1"  # below the threshold again: sticks
    assert router.snapshot()["affinity"] == {"stuck": 4, "spilled": 1, "placed": 0, "none": 0}
    # Among the replicas the filter left, the prefix and queue scorers could not tell the
    # candidates apart (the spill went to an idle replica, in turn).
    assert router.snapshot()["precise_prefix"] == {"best": 0, "overruled": 0, "even": 5}
    assert router.snapshot()["queue"] == {"best": 0, "overruled": 0, "even": 5}


def test_precise_prefix_counts_prompts_sent_before_their_events_arrive():
    now = [0.0]
    section = RouterSection(policy="precise_prefix")
    router = build_router(section, NAMES)
    router.prefix.clock = lambda: now[0]
    first = _start(router, _prefix_request("a0", TENANT_A))
    assert _start(router, _prefix_request("a1", TENANT_A)) == first  # no event yet
    now[0] += router.prefix.pending_s + 1  # the events should have come by now: they did not
    assert router.pick(_prefix_request("a2", TENANT_A)).name != first  # by load


def test_precise_prefix_prefers_the_longest_match_and_ignores_unknown_prompts():
    router = build_router("precise_prefix", NAMES)
    _cache_on(router, "r0", TENANT_A[:4])
    _cache_on(router, "r2", TENANT_A)
    assert router.kv_index.match(_prefix_request("x", TENANT_A).block_hashes) == {
        "r0": 1, "r2": 3}
    assert router.pick(_prefix_request("a", TENANT_A)).name == "r2"
    router.on_start(router.replicas[0])
    router.on_start(router.replicas[2])
    assert router.pick(_prefix_request("b", TENANT_B)).name == "r1"  # no prefix: by load
    assert router.pick(RoutingRequest("no hashes")).name == "r1"


def test_a_dead_replica_vanishes_from_the_index():
    router = build_router("precise_prefix", NAMES)
    _cache_on(router, "r0", TENANT_A)
    _cache_on(router, "r1", TENANT_A)
    router.update_stats(0, EngineStats(), is_healthy=False)
    hashes = _prefix_request("a", TENANT_A).block_hashes
    assert router.kv_index.replicas == ["r1"]
    assert router.kv_index.match(hashes) == {"r1": 3}
    router.update_stats(1, EngineStats(), is_healthy=False)
    assert router.kv_index.match(hashes) == {}
    assert router.kv_index.cursor("r1") == (None, 0)  # back healthy: starts from a snapshot


def test_approx_prefix_picks_the_replica_of_the_last_same_prefix_request():
    router = build_router("approx_prefix", NAMES)
    first = {name: _start(router, _prefix_request(name, tokens))
             for name, tokens in [("a", TENANT_A), ("b", TENANT_B)]}
    assert first == {"a": "r0", "b": "r1"}
    for replica in router.replicas[:2]:
        router.on_finish(replica)
    assert router.pick(_prefix_request("b2", TENANT_B + [7] * BLOCK)).name == "r1"
    assert router.pick(_prefix_request("a2", TENANT_A[:8] + [9] * BLOCK)).name == "r0"
    router.update_stats(0, EngineStats(), is_healthy=False)  # forgotten with its cache
    router.update_stats(0, EngineStats(), is_healthy=True)
    assert router.snapshot()["affinity"]["none"] == 2
    router.pick(_prefix_request("a3", TENANT_A))
    assert router.snapshot()["affinity"]["none"] == 3


@pytest.mark.parametrize("policy", ["precise_prefix", "approx_prefix"])
def test_a_new_prefix_goes_where_the_caches_have_room_not_only_where_the_queue_is_short(
        policy):
    def place_tenant_b(cached_blocks_weight: float) -> str:
        router = build_router(RouterSection(policy=policy,
                                            cached_blocks_weight=cached_blocks_weight), NAMES[:2])
        r0, r1 = router.replicas
        assert _start(router, _prefix_request("a0", TENANT_A)) == "r0"  # tenant A lives on r0
        router.on_finish(r0)
        for _ in range(2):  # r1 is busy with requests that share nothing
            router.on_start(r1)
        return router.pick(_prefix_request("b0", TENANT_B)).name

    assert place_tenant_b(cached_blocks_weight=0.0) == "r0"  # by the queue of the moment
    assert place_tenant_b(cached_blocks_weight=1.0) == "r1"  # where no prefix lives yet


def _with_caches(router: Router, num_kv_blocks: int) -> None:
    """The replicas' stats arrive: each has a cache of `num_kv_blocks` blocks."""
    for replica in router.replicas:
        router.update_stats(replica.index, EngineStats(num_kv_blocks=num_kv_blocks))


def _tenant(i: int) -> list[int]:
    return list(range(1000 * (i + 1), 1000 * (i + 1) + 3 * BLOCK))  # three blocks


@pytest.mark.parametrize("policy", ["precise_prefix", "approx_prefix"])
def test_cold_prefixes_arriving_together_are_placed_by_room_not_by_the_queue(policy):
    # Only the queue scorer ranks: without the filter every tenant would go to r0.
    section = RouterSection(policy=policy, cached_blocks_weight=0.0, kv_usage_weight=0.0,
                            saturation_threshold=100)
    router = build_router(section, NAMES[:2])
    _with_caches(router, num_kv_blocks=6)  # two tenants each
    for _ in range(3):  # r1 is busy with requests that share nothing
        router.on_start(router.replicas[1])
    placed = [_start(router, _prefix_request(f"t{i}", _tenant(i))) for i in range(4)]
    assert placed == ["r0", "r1", "r0", "r1"]
    # Later requests of each tenant stick to where its prefix is being computed.
    assert [_start(router, _prefix_request(f"t{i}b", _tenant(i))) for i in range(4)] == placed
    assert router.snapshot()["affinity"] == {"stuck": 4, "spilled": 0, "placed": 4, "none": 0}
    # The caches are full: room no longer decides, the queues do (r0 has 4, r1 has 7).
    assert router.pick(_prefix_request("t4", _tenant(4))).name == "r0"
    assert router.snapshot()["affinity"]["none"] == 1


def test_room_is_not_weighed_before_the_cache_sizes_are_known_nor_on_saturated_replicas():
    section = RouterSection(policy="precise_prefix", cached_blocks_weight=0.0,
                            saturation_threshold=3)
    router = build_router(section, NAMES[:2])
    _, r1 = router.replicas
    for _ in range(2):
        router.on_start(r1)
    assert _start(router, _prefix_request("a", _tenant(0))) == "r0"
    assert router.pick(_prefix_request("b", _tenant(1))).name == "r0"  # sizes unknown: queue
    _with_caches(router, num_kv_blocks=100)
    assert router.pick(_prefix_request("c", _tenant(2))).name == "r1"  # the room
    router.on_start(r1)  # r1, the roomier, is saturated: the other one takes it
    assert router.pick(_prefix_request("d", _tenant(3))).name == "r0"
    assert router.snapshot()["affinity"]["placed"] == 2


def test_the_matchers_count_each_replicas_blocks():
    now = [0.0]
    router = build_router("precise_prefix", NAMES)
    matcher = router.prefix
    matcher.clock = lambda: now[0]
    a0, b0 = _prefix_request("a0", TENANT_A), _prefix_request("b0", TENANT_B[:8])
    matcher.on_pick(a0, router.replicas[0])
    matcher.on_pick(a0, router.replicas[0])  # the same blocks again: counted once
    matcher.on_pick(b0, router.replicas[1])
    assert [matcher.num_blocks(n) for n in NAMES] == [3, 2, 0]
    _cache_on(router, "r2", TENANT_A)  # events: three blocks cached there
    now[0] += matcher.pending_s + 1
    matcher.on_pick(RoutingRequest("none"), router.replicas[2])  # pending entries expire
    assert [matcher.num_blocks(n) for n in NAMES] == [0, 0, 3]
    matcher.on_pick(b0, router.replicas[2])
    router.update_stats(2, EngineStats(), is_healthy=False)
    assert matcher.num_blocks("r2") == 0

    history = HistoryMatcher(capacity_blocks=4)
    replicas = [ReplicaState(0, "r0"), ReplicaState(1, "r1")]
    history.on_pick(a0, replicas[0])
    history.on_pick(a0, replicas[1])
    history.on_pick(b0, replicas[1])  # the oldest block hash is forgotten for both
    assert (history.num_blocks("r0"), history.num_blocks("r1")) == (2, 4)
    history.forget("r1")
    assert (history.num_blocks("r0"), history.num_blocks("r1")) == (2, 0)


def test_approx_history_is_bounded_least_recently_routed_first():
    matcher = HistoryMatcher(capacity_blocks=3)
    replicas = [ReplicaState(0, "r0")]
    matcher.on_pick(_prefix_request("a", TENANT_A), replicas[0])
    matcher.on_pick(_prefix_request("b", TENANT_B[:4]), replicas[0])
    assert matcher.matched_blocks(_prefix_request("a", TENANT_A), replicas) == [0]
    assert matcher.matched_blocks(_prefix_request("b", TENANT_B), replicas) == [1]


def test_each_decision_is_logged_and_counted_for_the_metrics(caplog):
    router = build_router("precise_prefix", NAMES)
    _cache_on(router, "r2", TENANT_A)
    with caplog.at_level(logging.DEBUG, logger="fleetlm.router"):
        router.pick(_prefix_request("req-1", TENANT_A))
    assert "route req-1 -> r2; r2 " in caplog.text and "precise_prefix=1.000" in caplog.text
    text = render_metrics([], routers=[("m", router.snapshot()), ("m", router.snapshot())])
    assert ('fleetlm:router_decisions_total{model_name="m",outcome="stuck",stage="affinity"} 2.0'
            in text)
    assert ('fleetlm:router_decisions_total{model_name="m",outcome="even",stage="queue"} 2.0'
            in text)


def test_replicas_come_and_go_and_a_gone_one_is_forgotten():
    router = build_router("approx_prefix", ["r0", "r1"])
    request = RoutingRequest("req", block_hashes=(1, 2))
    holder = router.pick(request)
    router.set_replicas(["r1", "r0", "r2"])  # Serve added one; the others keep their state
    assert router.pick(request).name == holder.name
    router.set_replicas([n for n in ("r0", "r1", "r2") if n != holder.name])
    assert router.prefix.matched_blocks(request, router.replicas) == [0, 0]
    assert sorted(r.name for r in router.replicas) == sorted({"r0", "r1", "r2"} - {holder.name})


def test_rank_puts_the_pick_first_and_the_filtered_out_last():
    router = build_router("precise_prefix", NAMES)
    router.update_stats(0, EngineStats(), is_healthy=False)
    ranked = router.rank(REQUEST)
    assert [r.name for r in ranked][-1] == "r0" and len(ranked) == 3
    assert router.rank(REQUEST, names=["r2"])[0].name == "r2"


def test_when_every_replica_is_saturated_the_prefix_stays_unless_its_queue_is_far_longer():
    """Spilling from one busy replica to another only moves the queue and splits the tenant
    over two caches: with every replica saturated, the prefix's replica keeps its requests
    until it holds a threshold more than the least loaded one."""
    section = RouterSection(policy="precise_prefix", saturation_threshold=2)
    router = build_router(section, NAMES)
    _cache_on(router, "r1", TENANT_A)
    for replica in router.replicas:  # every replica at the threshold
        replica.stats = EngineStats(num_running=2)
    request = _prefix_request("a", TENANT_A + [1] * BLOCK)
    assert router.pick(request).name == "r1"
    router.replicas[1].stats = EngineStats(num_running=3)  # one more: still within 2
    assert router.pick(request).name == "r1"
    router.replicas[1].stats = EngineStats(num_running=4)  # two more than the others
    assert router.pick(request).name != "r1"
    assert router.snapshot()["affinity"] == {"stuck": 2, "spilled": 1, "placed": 0, "none": 0}
