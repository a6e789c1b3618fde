"""Which engine replica serves a request: filters, then weighted scorers, then a picker.

    candidates = every filter applied in turn (never to an empty list)
    score(r)   = sum(weight * scorer(r)) over the scorers, each scorer in [0, 1]
    pick       = the best score; ties go round-robin

Round-robin is "no scorers"; least-loaded is one queue scorer. The prefix-aware policies add
a `PrefixMatcher` (how many leading blocks of the prompt each replica holds): precise from a
`KVIndex` mirrored from the replicas' KV events, approximate from the router's own history of
where it sent which blocks (for engines without events). It feeds a prefix scorer (matched
blocks / prompt blocks) and the affinity filter, which keeps a request on the replicas with
its longest prefix unless they are saturated (load at or past a threshold): the saturation
valve, so affinity never piles everything on one replica. A cached-blocks scorer places a
prefix that no replica holds where the fewest blocks are cached or on their way (SGLang's
cache-aware router sends such a prompt to its smallest tree), so the prefixes, which stay
where they land, spread over the caches rather than by the queues of the moment.

Every decision is logged at debug level (each candidate's scores) and counted per scorer
(`best`: the pick had that scorer's top score; `overruled`: it did not; `even`: the scorer
scored every candidate alike) and per affinity outcome (`stuck`, `spilled`, `none`);
`Router.snapshot()` hands the counts to `fleetlm.cluster.metrics.render_metrics`.

The router runs inside Ray Serve's request router (serve_router.py), in every process that
holds a handle to an engine pool: Serve tells it which replicas exist (`set_replicas`), each
request routed and completed (`on_start` / `on_finish`: in-flight counts), and the replicas'
own queue and KV usage (their routing stats, as `ReplicaState.stats`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fleetlm.cluster.config import RouterSection
from fleetlm.cluster.kv_index import KVIndex
from fleetlm.executor.protocol import EngineStats

logger = logging.getLogger("fleetlm.router")


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
    """What a routing decision may look at; it travels with the request to the replica as
    the `routing` keyword (serve_router.py reads it there)."""

    request_id: str
    prompt_text: str = ""
    # The prompt's chained block hashes (`fleetlm.cluster.kv_index.hash_prompt_blocks`, the
    # engine's block size and seed); empty: unknown, and prefix matching sees no prefix.
    block_hashes: tuple[int, ...] = ()
    # Each prompt's token ids as the engine will see them (the chat template applied),
    # tokenized once at the ingress; None: the replica tokenizes.
    prompt_token_ids: tuple[tuple[int, ...], ...] | None = None
    # A question for one replica in particular (its metrics, KV events, health): only it.
    target: str | None = None
    # Precise routing: the last KV event batch the router's index applied of each engine
    # (engine id, seq); the replica sends its newer batches back with the stream's first
    # chunk (`StreamChunk.kv_events`), so that a busy replica needs no asking.
    kv_cursors: tuple[tuple[str, int], ...] = ()


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


def load_of(replica: ReplicaState) -> int:
    """Requests at the replica: this ingress's own in-flight count (always current) or its
    engine's running + waiting (as of its last stats, other ingresses' requests included),
    whichever is larger. Their sum would count this ingress's queued requests twice, and
    the valve would open at about half its threshold's real load."""
    return max(replica.num_inflight, replica.stats.num_running + replica.stats.num_waiting)


def queue_scorer(request: RoutingRequest, replicas: list[ReplicaState]) -> list[float]:
    """Fewer requests in flight (plus waiting in the engine) scores higher."""
    loads = [load_of(r) for r in replicas]
    most = max(loads)
    return [1.0 - load / most if most else 1.0 for load in loads]


def kv_usage_scorer(request: RoutingRequest, replicas: list[ReplicaState]) -> list[float]:
    """More free KV cache scores higher."""
    return [1.0 - r.stats.kv_cache_usage for r in replicas]


class PrefixMatcher(Protocol):
    """How many leading blocks of a prompt each replica holds, as far as the router knows."""

    name: str

    def matched_blocks(self, request: RoutingRequest, replicas: list[ReplicaState]) -> list[int]:
        ...

    def on_pick(self, request: RoutingRequest, replica: ReplicaState) -> None:
        """The request goes to `replica` (an approximate matcher remembers it)."""
        ...

    def forget(self, replica_name: str) -> None:
        """The replica is gone or unhealthy: nothing of its cache can be counted on."""
        ...

    def num_blocks(self, replica_name: str) -> int:
        """How many blocks the matcher counts the replica as holding or computing."""
        ...


class IndexMatcher:
    """Precise: the replicas' cached blocks as their KV events told the index, plus where
    this router sent a prompt in the last `pending_s` seconds: its blocks are being computed
    there and no event has said so yet (requests of one tenant arriving together would
    otherwise each compute the prefix on another replica)."""

    name = "precise_prefix"

    def __init__(self, index: KVIndex, pending_s: float = 10.0,
                 clock=time.monotonic) -> None:
        self.index = index
        self.pending_s = pending_s
        self.clock = clock
        self._pending: OrderedDict[int, dict[str, float]] = OrderedDict()  # hash -> until
        self._num_pending: dict[str, int] = {}  # replica -> its entries in _pending

    def matched_blocks(self, request: RoutingRequest, replicas: list[ReplicaState]) -> list[int]:
        matched = self.index.match(request.block_hashes)
        now = self.clock()
        result = []
        for replica in replicas:
            num_pending = 0
            for block_hash in request.block_hashes:
                if self._pending.get(block_hash, {}).get(replica.name, 0.0) <= now:
                    break
                num_pending += 1
            result.append(max(matched.get(replica.name, 0), num_pending))
        return result

    def on_pick(self, request: RoutingRequest, replica: ReplicaState) -> None:
        now = self.clock()
        for block_hash in request.block_hashes:
            holders = self._pending.setdefault(block_hash, {})
            if replica.name not in holders:
                self._num_pending[replica.name] = self._num_pending.get(replica.name, 0) + 1
            holders[replica.name] = now + self.pending_s
            self._pending.move_to_end(block_hash)
        while self._pending and max(next(iter(self._pending.values())).values(),
                                    default=0.0) <= now:
            _, holders = self._pending.popitem(last=False)  # oldest first: the rest is newer
            for name in holders:
                self._num_pending[name] -= 1

    def forget(self, replica_name: str) -> None:
        if replica_name in self.index.replicas:
            self.index.remove_replica(replica_name)
        for holders in self._pending.values():
            holders.pop(replica_name, None)
        self._num_pending.pop(replica_name, None)

    def num_blocks(self, replica_name: str) -> int:
        """Cached blocks as the KV events tell, plus blocks of prompts sent there lately
        (some of which the events may already count)."""
        return self.index.num_blocks(replica_name) + self._num_pending.get(replica_name, 0)


class HistoryMatcher:
    """Approximate: the replicas this router sent each block to, the `capacity_blocks` most
    recently routed block hashes only (least recently routed forgotten first). It cannot see
    evictions, so it overestimates what a busy replica still holds."""

    name = "approx_prefix"

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be at least 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._sent_to: OrderedDict[int, set[str]] = OrderedDict()  # block hash -> replicas
        self._num_sent: dict[str, int] = {}  # replica -> block hashes remembered for it

    def matched_blocks(self, request: RoutingRequest, replicas: list[ReplicaState]) -> list[int]:
        matched = []
        for replica in replicas:
            num_blocks = 0
            for block_hash in request.block_hashes:
                if replica.name not in self._sent_to.get(block_hash, ()):
                    break
                num_blocks += 1
            matched.append(num_blocks)
        return matched

    def on_pick(self, request: RoutingRequest, replica: ReplicaState) -> None:
        for block_hash in request.block_hashes:
            holders = self._sent_to.setdefault(block_hash, set())
            if replica.name not in holders:
                holders.add(replica.name)
                self._num_sent[replica.name] = self._num_sent.get(replica.name, 0) + 1
            self._sent_to.move_to_end(block_hash)
        while len(self._sent_to) > self.capacity_blocks:
            _, holders = self._sent_to.popitem(last=False)
            for name in holders:
                self._num_sent[name] -= 1

    def forget(self, replica_name: str) -> None:
        for block_hash in list(self._sent_to):
            holders = self._sent_to[block_hash]
            holders.discard(replica_name)
            if not holders:
                del self._sent_to[block_hash]
        self._num_sent.pop(replica_name, None)

    def num_blocks(self, replica_name: str) -> int:
        return self._num_sent.get(replica_name, 0)


class PrefixScorer:
    """Matched leading blocks / prompt blocks (0 for a prompt without full blocks)."""

    def __init__(self, matcher: PrefixMatcher) -> None:
        self.matcher = matcher
        self.name = matcher.name

    def __call__(self, request: RoutingRequest, replicas: list[ReplicaState]) -> list[float]:
        num_blocks = len(request.block_hashes)
        if not num_blocks:
            return [0.0] * len(replicas)
        return [m / num_blocks for m in self.matcher.matched_blocks(request, replicas)]


class CachedBlocksScorer:
    """Fewer blocks cached or on their way (as the matcher counts them) scores higher. It
    decides where a prefix that no replica holds goes: there it stays, so placing it by the
    queues of the moment can leave one replica with more prefixes than its cache holds."""

    name = "cached_blocks"

    def __init__(self, matcher: PrefixMatcher) -> None:
        self.matcher = matcher

    def __call__(self, request: RoutingRequest, replicas: list[ReplicaState]) -> list[float]:
        sizes = [self.matcher.num_blocks(r.name) for r in replicas]
        most = max(sizes)
        return [1.0 - size / most if most else 1.0 for size in sizes]


class AffinityFilter:
    """Keep the replicas holding the prompt's longest prefix, unless every one of them is
    saturated (`load_of` at or past `saturation_threshold`): then keep the unsaturated
    others (the valve; the scorers still prefer longer prefixes among them). When every
    replica is saturated, spilling would only move the queue and cost the cache its
    prefixes: the holders are kept unless they hold `saturation_threshold` requests more
    than the least loaded replica.

    A prompt that no replica holds is placed by room: where it is first computed, its later
    requests stick. While the emptiest unsaturated replica's cache (its `num_kv_blocks`)
    still has room for the whole prompt, keep only the unsaturated replicas holding less
    than half a prompt more than that one; placed by the queues of the moment, cold
    prefixes arriving together could leave one replica more than its cache holds. Once the
    caches are full, room says nothing (a busy replica holds more blocks not yet hashed, so
    it would look roomier), and the scorers decide."""

    name = "affinity"

    def __init__(self, matcher: PrefixMatcher, saturation_threshold: int) -> None:
        if saturation_threshold < 1:
            raise ValueError(f"saturation_threshold must be at least 1, got "
                             f"{saturation_threshold}")
        self.matcher = matcher
        self.saturation_threshold = saturation_threshold
        self.counts = {"stuck": 0, "spilled": 0, "placed": 0, "none": 0}

    def __call__(self, request: RoutingRequest, replicas: list[ReplicaState]) -> list[ReplicaState]:
        matched = self.matcher.matched_blocks(request, replicas)
        longest = max(matched, default=0)
        unsaturated = [r for r in replicas if load_of(r) < self.saturation_threshold]
        if not longest:
            placed = self._by_room(len(request.block_hashes), unsaturated)
            self.counts["placed" if placed else "none"] += 1
            return placed or replicas
        preferred = [r for r, m in zip(replicas, matched, strict=True) if m == longest]
        keep = [r for r in preferred if load_of(r) < self.saturation_threshold]
        if not keep and not unsaturated:  # all busy: spill only from a far longer queue
            least = min(load_of(r) for r in replicas)
            keep = [r for r in preferred if load_of(r) - least < self.saturation_threshold]
        if keep:
            self.counts["stuck"] += 1
            return keep
        self.counts["spilled"] += 1
        return unsaturated

    def _by_room(self, num_blocks: int, replicas: list[ReplicaState]) -> list[ReplicaState]:
        """The replicas with room for a new prompt of `num_blocks` blocks (see the class);
        empty: room does not decide."""
        if not num_blocks or not replicas or not all(r.stats.num_kv_blocks for r in replicas):
            return []
        held = [self.matcher.num_blocks(r.name) for r in replicas]
        fewest = min(held)
        emptiest = replicas[held.index(fewest)]
        if fewest + num_blocks > emptiest.stats.num_kv_blocks:
            return []
        return [r for r, h in zip(replicas, held, strict=True) if 2 * (h - fewest) < num_blocks]


def _name_of(part) -> str:
    return getattr(part, "name", None) or part.__name__.removesuffix("_scorer")


class Router:
    def __init__(
        self,
        replica_names: Sequence[str],
        filters: Sequence[Filter] = (healthy_filter,),
        scorers: Sequence[tuple[Scorer, float]] = (),
        prefix: PrefixMatcher | None = None,
    ) -> None:
        self.replicas = [ReplicaState(i, name) for i, name in enumerate(replica_names)]
        self._num_indices = len(self.replicas)  # indices are never reused
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.prefix = prefix  # told of every pick and of unhealthy replicas
        self._next_index = 0  # ties go to the first replica from here on: round-robin
        self._outcomes = {_name_of(s): {"best": 0, "overruled": 0, "even": 0} for s, _ in scorers}

    @property
    def kv_index(self) -> KVIndex | None:
        """The index a precise policy routes by, for the ingress to feed with KV events."""
        return self.prefix.index if isinstance(self.prefix, IndexMatcher) else None

    def set_replicas(self, names: Sequence[str]) -> None:
        """The replicas that exist now (Serve added or removed some): new ones start empty,
        gone ones are forgotten with whatever the prefix matcher knew of their caches."""
        known = {r.name: r for r in self.replicas}
        for replica in self.replicas:
            if replica.name not in names and self.prefix is not None:
                self.prefix.forget(replica.name)
        self.replicas = []
        for name in names:
            replica = known.get(name)
            if replica is None:
                replica = ReplicaState(self._num_indices, name)
                self._num_indices += 1
            self.replicas.append(replica)

    def replica(self, name: str) -> ReplicaState | None:
        return next((r for r in self.replicas if r.name == name), None)

    def pick(self, request: RoutingRequest) -> ReplicaState:
        return self.rank(request)[0]

    def rank(self, request: RoutingRequest,
             names: Sequence[str] | None = None) -> list[ReplicaState]:
        """All replicas (or those named), best first: the pick, then the other candidates
        the filters kept by score, then those they left out (somewhere to go when the
        better ones are full)."""
        everyone = self.replicas if names is None else [r for r in self.replicas
                                                         if r.name in names]
        if not everyone:
            raise ValueError("a router needs at least one replica")
        candidates = everyone
        for keep in self.filters:
            candidates = keep(request, candidates) or candidates
        scores = [(scorer, weight, scorer(request, candidates)) for scorer, weight in self.scorers]
        totals = [sum(weight * each[i] for _, weight, each in scores)
                  for i in range(len(candidates))]
        modulus = max(self._num_indices, 1)
        order = sorted(range(len(candidates)), key=lambda i: (
            -totals[i], (candidates[i].index - self._next_index) % modulus))  # ties: in turn
        choice = candidates[order[0]]
        self._next_index = choice.index + 1
        self._count(scores, order[0])
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("route %s -> %s; %s", request.request_id, choice.name,
                         _describe(candidates, scores, totals))
        if self.prefix is not None:
            self.prefix.on_pick(request, choice)
        ranked = [candidates[i] for i in order]
        return ranked + [r for r in everyone if r not in ranked]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Decisions so far per scorer and filter (`name -> outcome -> count`), for
        `fleetlm.cluster.metrics.render_metrics(router_snapshots=...)`."""
        outcomes = {name: dict(counts) for name, counts in self._outcomes.items()}
        for keep in self.filters:
            if hasattr(keep, "counts"):
                outcomes[_name_of(keep)] = dict(keep.counts)
        return outcomes

    def _count(self, scores: list[tuple[Scorer, float, list[float]]], chosen: int) -> None:
        for scorer, _, each in scores:
            outcome = "even" if min(each) == max(each) else \
                "best" if each[chosen] == max(each) else "overruled"
            self._outcomes[_name_of(scorer)][outcome] += 1

    def on_start(self, replica: ReplicaState) -> None:
        replica.num_inflight += 1

    def on_finish(self, replica: ReplicaState) -> None:
        assert replica.num_inflight > 0, f"{replica.name} finished more requests than it started"
        replica.num_inflight -= 1

    def update_stats(self, index: int, stats: EngineStats, is_healthy: bool = True) -> None:
        """A replica's latest engine statistics. An unhealthy one's prefix entries are
        purged: once healthy again, its KV events start over from a snapshot."""
        replica = self.replicas[index]
        replica.stats = stats
        self.set_health(replica, is_healthy)

    def set_health(self, replica: ReplicaState, is_healthy: bool) -> None:
        replica.is_healthy = is_healthy
        if not is_healthy and self.prefix is not None:
            self.prefix.forget(replica.name)


def _describe(candidates: list[ReplicaState], scores: list, totals: list[float]) -> str:
    """`name total (scorer=score ...)` per candidate, for the debug log."""
    parts = []
    for i, replica in enumerate(candidates):
        each = " ".join(f"{_name_of(scorer)}={values[i]:.3f}" for scorer, _, values in scores)
        parts.append(f"{replica.name} {totals[i]:.3f} ({each})")
    return ", ".join(parts)


POLICIES = ("round_robin", "least_loaded", "precise_prefix", "approx_prefix")


def build_router(config: str | RouterSection, replica_names: Sequence[str]) -> Router:
    """The router of a configured policy: a `RouterSection`, or a policy name with the
    section's default weights. A precise router makes its own `KVIndex` (`Router.kv_index`)
    for the caller to feed."""
    section = config if isinstance(config, RouterSection) else _section_of(config)
    if section.policy == "round_robin":
        return Router(replica_names)
    load_scorers = [(queue_scorer, section.queue_weight),
                    (kv_usage_scorer, section.kv_usage_weight)]
    if section.policy == "least_loaded":
        return Router(replica_names, scorers=[(queue_scorer, 1.0)])
    matcher: PrefixMatcher = IndexMatcher(KVIndex()) if section.policy == "precise_prefix" \
        else HistoryMatcher(section.approx_history_blocks)
    filters = [healthy_filter, AffinityFilter(matcher, section.saturation_threshold)]
    scorers = [(PrefixScorer(matcher), section.prefix_weight), *load_scorers,
               (CachedBlocksScorer(matcher), section.cached_blocks_weight)]
    return Router(replica_names, filters, scorers, prefix=matcher)


def _section_of(policy: str) -> RouterSection:
    if policy not in POLICIES:
        raise ValueError(f"router policy {policy!r} is not implemented; use one of: "
                         f"{', '.join(POLICIES)}")
    return RouterSection(policy=policy)
