"""The routing table between Serve's request router and fleetlm's policy: what Serve hands
`choose_replicas` (its running replicas, their routing stats) in, ranks of replicas out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fleetlm.cluster.config import RouterSection
from fleetlm.cluster.router import RoutingRequest
from fleetlm.cluster.serve_router import RoutingTable


@dataclass(frozen=True)
class _ReplicaID:
    unique_id: str


@dataclass
class _Running:
    """The two attributes of Serve's `RunningReplica` the table reads."""

    name: str
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self) -> _ReplicaID:
        return _ReplicaID(self.name)


def _table(policy: str, names=("a", "b")) -> tuple[RoutingTable, list[_Running]]:
    table = RoutingTable(RouterSection(policy=policy))
    table.set_replicas(list(names))
    return table, [_Running(n) for n in names]


def _names(ranks) -> list[list[str]]:
    return [[r.name for r in rank] for rank in ranks]


def test_a_targeted_question_goes_to_its_replica_only():
    table, running = _table("round_robin")
    assert _names(table.rank(running, RoutingRequest("", target="b"))) == [["b"]]
    assert table.rank(running, RoutingRequest("", target="gone")) == []  # Serve retries
    assert _names(table.rank(running, None)) == [["a", "b"]]  # anywhere: Serve's pick


def test_in_flight_counts_follow_serves_hooks_and_steer_least_loaded():
    table, running = _table("least_loaded")
    table.on_routed("s1", "a", RoutingRequest("r1"))
    table.on_routed("s2", "a", RoutingRequest("r2"))
    assert _names(table.rank(running, RoutingRequest("r3"))) == [["b"], ["a"]]
    table.on_completed("s1")
    table.on_completed("s2")
    table.on_routed("s3", "b", RoutingRequest("r3"))
    assert _names(table.rank(running, RoutingRequest("r4"))) == [["a"], ["b"]]
    assert table.replica_of("r1") == "a"  # still known after it ended, for its caller


def test_questions_are_not_counted_as_load():
    table, _ = _table("least_loaded")
    table.on_routed("s1", "a", RoutingRequest("", target="a"))
    assert [r.num_inflight for r in table.router.replicas] == [0, 0]
    table.on_completed("s1")


def test_replica_stats_from_serve_reach_the_scorers():
    table, running = _table("least_loaded")
    running[0].routing_stats = {"num_waiting": 5, "num_running": 1, "kv_cache_usage": 0.5,
                                "num_kv_blocks": 640}
    assert _names(table.rank(running, RoutingRequest("r")))[0] == ["b"]
    assert table.router.replica("a").stats.num_waiting == 5
    assert table.router.replica("a").stats.num_kv_blocks == 640


def test_a_timed_mark_down_ends_by_itself():
    table, running = _table("round_robin")
    table.set_health("a", False, for_s=0.05)
    assert [_names(table.rank(running, RoutingRequest(str(i))))[0] for i in range(2)] == \
        [["b"], ["b"]]
    deadline = time.monotonic() + 5
    while not table.is_healthy("a"):
        assert time.monotonic() < deadline
        table.rank(running, RoutingRequest("tick"))  # routing looks at the clock
    assert table.is_healthy("a")


def test_a_replica_serve_removed_is_forgotten_with_its_prefixes():
    table, running = _table("approx_prefix")
    request = RoutingRequest("r", block_hashes=(7, 8))
    [[first], _] = table.rank(running, request)
    table.set_replicas([n for n in ("a", "b") if n != first.name])
    assert table.replica_names() == [n for n in ("a", "b") if n != first.name]
    table.set_replicas(["a", "b"])  # it (or a namesake) is back: holding nothing
    assert table.router.prefix.matched_blocks(request, table.router.replicas) == [0, 0]
