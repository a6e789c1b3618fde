"""Which engine replica serves a request: filters, then weighted scorers, then a picker.

    candidates = every filter applied in turn (never to an empty list)
    score(r)   = sum(weight * scorer(r)) over the scorers, each scorer in [0, 1]
    pick       = the best score; ties go round-robin

Round-robin is "no scorers"; least-loaded is one queue scorer. Prefix-aware routing (a later
issue) adds a prefix-match scorer fed by the replicas' KV events plus a saturation filter, so
affinity never piles everything on one replica; nothing here has to change for it.

The router runs inside the ingress and knows each replica's in-flight count from its own
bookkeeping (`on_start` / `on_finish`); engine statistics, when the ingress has them, arrive
through `update_stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fleetlm.executor.protocol import EngineStats


@dataclass
class ReplicaState:
    """What the router knows about one replica."""

    index: int
    name: str
    num_inflight: int = 0  # requests this ingress sent there that have not finished
    is_healthy: bool = True
    stats: EngineStats = field(default_factory=EngineStats)


@dataclass(frozen=True)
class RoutingRequest:
    """What a routing decision may look at."""

    request_id: str
    prompt_text: str = ""


class Filter(Protocol):
    def __call__(self, request: RoutingRequest, replicas: list[ReplicaState]) -> list[ReplicaState]:
        """A subset of `replicas` (may be empty: the router then ignores this filter)."""
        ...


class Scorer(Protocol):
    def __call__(self, request: RoutingRequest, replicas: list[ReplicaState]) -> list[float]:
        """One score in [0, 1] per replica; higher is better."""
        ...


def healthy_filter(request: RoutingRequest, replicas: list[ReplicaState]) -> list[ReplicaState]:
    return [r for r in replicas if r.is_healthy]


def queue_scorer(request: RoutingRequest, replicas: list[ReplicaState]) -> list[float]:
    """Fewer requests in flight (plus waiting in the engine) scores higher."""
    loads = [r.num_inflight + r.stats.num_waiting for r in replicas]
    most = max(loads)
    return [1.0 - load / most if most else 1.0 for load in loads]


def kv_usage_scorer(request: RoutingRequest, replicas: list[ReplicaState]) -> list[float]:
    """More free KV cache scores higher."""
    return [1.0 - r.stats.kv_cache_usage for r in replicas]


class Router:
    def __init__(
        self,
        replica_names: Sequence[str],
        filters: Sequence[Filter] = (healthy_filter,),
        scorers: Sequence[tuple[Scorer, float]] = (),
    ) -> None:
        if not replica_names:
            raise ValueError("a router needs at least one replica")
        self.replicas = [ReplicaState(i, name) for i, name in enumerate(replica_names)]
        self.filters = list(filters)
        self.scorers = list(scorers)
        self._next_index = 0  # ties go to the first replica from here on: round-robin

    def pick(self, request: RoutingRequest) -> ReplicaState:
        candidates = self.replicas
        for keep in self.filters:
            candidates = keep(request, candidates) or candidates
        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            for i, score in enumerate(scorer(request, candidates)):
                totals[i] += weight * score
        best = max(totals)
        tied = [r for r, total in zip(candidates, totals) if total == best]
        num_replicas = len(self.replicas)
        choice = min(tied, key=lambda r: (r.index - self._next_index) % num_replicas)
        self._next_index = choice.index + 1
        return choice

    def on_start(self, replica: ReplicaState) -> None:
        replica.num_inflight += 1

    def on_finish(self, replica: ReplicaState) -> None:
        assert replica.num_inflight > 0, f"{replica.name} finished more requests than it started"
        replica.num_inflight -= 1

    def update_stats(self, index: int, stats: EngineStats, is_healthy: bool = True) -> None:
        self.replicas[index].stats = stats
        self.replicas[index].is_healthy = is_healthy


_POLICIES: dict[str, Callable[[Sequence[str]], Router]] = {
    "round_robin": lambda names: Router(names),
    "least_loaded": lambda names: Router(names, scorers=[(queue_scorer, 1.0)]),
}


def build_router(policy: str, replica_names: Sequence[str]) -> Router:
    """The router of a configured policy (`RouterSection.policy`)."""
    if policy not in _POLICIES:
        known = ", ".join(_POLICIES)
        raise ValueError(f"router policy {policy!r} is not implemented; use one of: {known}")
    return _POLICIES[policy](replica_names)
