"""fleetlm's routing policy inside Ray Serve's request router.

An engine pool is one Serve deployment with `num_replicas` (or autoscaling); every handle
to it routes through `FleetlmRequestRouter`, Serve's public request-router API, so Serve's
health checks, replacement and autoscaling apply while fleetlm's `Router` (router.py:
filters, scorers, the prefix index) decides:

    ingress ──handle.chat.remote(body, id, resume, routing=RoutingRequest)──> Serve's router
        FleetlmRequestRouter.choose_replicas(candidates, pending request)
            RoutingTable.rank: fleetlm's Router over the candidates ──> [[best], [next], ...]
        Serve sends to the first rank with room (max_ongoing_requests), else the next

The `RoutingTable` (one per deployment per process) is what the router instances and the
caller share: the `Router`, which replica each request went to, in-flight counts from Serve's
routed/completed hooks, and the replicas' own load (`LLMServer.record_routing_stats`: queue
and KV usage, fetched by Serve every ROUTING_STATS_PERIOD_S). Serve runs its routers on
their own event loop thread, so the table's lock guards every use of the `Router`.

A request whose `RoutingRequest.target` names a replica goes there only: how the ingress
asks one replica in particular (its metrics, KV events, health).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

# generate_request_id and _set_request_context are Ray Serve's private API (see `send`).
from ray.serve._private.utils import generate_request_id
from ray.serve.context import _set_request_context
from ray.serve.request_router import PendingRequest, RunningReplica

from fleetlm.cluster.config import RouterSection
from fleetlm.cluster.router import ReplicaState, Router, RoutingRequest, build_router
from fleetlm.executor.protocol import EngineStats

logger = logging.getLogger(__name__)

# Serve's request router class: request_router.py (Serve pickles that module by value, so it
# holds only the class, which finds this module's tables by import).
REQUEST_ROUTER = "fleetlm.cluster.request_router:FleetlmRequestRouter"
# How often Serve asks each replica for its queue and KV usage (`record_routing_stats`).
ROUTING_STATS_PERIOD_S = 1.0
ROUTING_STATS_TIMEOUT_S = 5.0
# Which replica recent requests went to, for their callers to look up after a failure.
REMEMBERED_REQUESTS = 4096

_tables: dict[str, RoutingTable] = {}
_tables_lock = threading.Lock()


def send(method, *args, **kwargs):
    """`method.remote(*args, **kwargs)` (a handle's method) as a request of its own. Serve
    gives a call made while serving a request that request's internal id, which its router
    uses to match the replica it chose to the call: two calls of one request at once (the
    ingress asking every replica for its metrics) would take each other's replicas."""
    def remote():
        _set_request_context(_internal_request_id=generate_request_id())
        return method.remote(*args, **kwargs)

    return contextvars.copy_context().run(remote)


def routing_table(app: str, deployment: str, section: RouterSection | None = None
                  ) -> RoutingTable:
    """This process's table of a deployment; made on first use with `section`'s policy."""
    key = f"{app}#{deployment}"
    with _tables_lock:
        table = _tables.get(key)
        if table is None:
            table = _tables[key] = RoutingTable(section or RouterSection())
        return table


class RoutingTable:
    def __init__(self, section: RouterSection) -> None:
        self.router: Router = build_router(section, [])
        self.lock = threading.Lock()
        self._routed: dict[str, tuple[str, str | None]] = {}  # Serve's id -> replica, our id
        self._replica_of: OrderedDict[str, str] = OrderedDict()  # our request id -> replica
        self._healthy_at: dict[str, float] = {}  # replica -> when a timed mark-down ends

    # ---- Serve's side ----------------------------------------------------------------------

    def set_replicas(self, names: list[str]) -> None:
        with self.lock:
            if [r.name for r in self.router.replicas] != names:
                self.router.set_replicas(names)

    def rank(self, candidates: list[RunningReplica], routing: RoutingRequest | None
             ) -> list[list[RunningReplica]]:
        if routing is None:  # a question any replica answers: Serve's own choice
            return [candidates]
        by_name = {c.replica_id.unique_id: c for c in candidates}
        if routing.target is not None:
            target = by_name.get(routing.target)
            return [[target]] if target is not None else []
        with self.lock:
            now = time.monotonic()
            for replica in self.router.replicas:
                candidate = by_name.get(replica.name)
                if candidate is not None:
                    replica.stats = _stats_of(candidate.routing_stats)
                if self._healthy_at.get(replica.name, now) < now:
                    del self._healthy_at[replica.name]
                    replica.is_healthy = True
            names = [n for n in by_name if self.router.replica(n) is not None]
            if not names:  # not told of them yet: Serve's own order
                return [candidates]
            ranked = self.router.rank(routing, names)
        return [[by_name[r.name]] for r in ranked]

    def on_routed(self, serve_id: str, replica: str, routing: RoutingRequest | None) -> None:
        request_id = routing.request_id if routing is not None and routing.target is None \
            else None
        with self.lock:
            state = self.router.replica(replica)
            if state is not None and request_id is not None:
                self.router.on_start(state)
            self._routed[serve_id] = (replica, request_id)
            if request_id:
                self._replica_of[request_id] = replica
                self._replica_of.move_to_end(request_id)
                if len(self._replica_of) > REMEMBERED_REQUESTS:
                    self._replica_of.popitem(last=False)

    def on_completed(self, serve_id: str) -> None:
        with self.lock:
            replica, request_id = self._routed.pop(serve_id, (None, None))
            if request_id is None:
                return
            state = self.router.replica(replica)
            if state is not None and state.num_inflight > 0:
                self.router.on_finish(state)

    # ---- the caller's side -----------------------------------------------------------------

    def replica_of(self, request_id: str) -> str | None:
        """The replica `request_id` last went to (None before it was routed)."""
        with self.lock:
            return self._replica_of.get(request_id)

    def replica_names(self) -> list[str]:
        with self.lock:
            return [r.name for r in self.router.replicas]

    def set_health(self, name: str, is_healthy: bool, for_s: float | None = None
                   ) -> ReplicaState | None:
        """Mark a replica (un)healthy; `for_s`: healthy again after that long, unasked."""
        with self.lock:
            replica = self.router.replica(name)
            if replica is not None:
                self.router.set_health(replica, is_healthy)
                if for_s is not None and not is_healthy:
                    self._healthy_at[name] = time.monotonic() + for_s
                else:
                    self._healthy_at.pop(name, None)
            return replica

    def is_healthy(self, name: str) -> bool:
        with self.lock:
            replica = self.router.replica(name)
            return replica is not None and replica.is_healthy

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return self.router.snapshot()


def _stats_of(routing_stats: dict[str, Any] | None) -> EngineStats:
    stats = routing_stats or {}
    return EngineStats(num_running=int(stats.get("num_running", 0)),
                       num_waiting=int(stats.get("num_waiting", 0)),
                       kv_cache_usage=float(stats.get("kv_cache_usage", 0.0)),
                       num_kv_blocks=int(stats.get("num_kv_blocks", 0)))


def routing_of(pending_request: PendingRequest | None) -> RoutingRequest | None:
    if pending_request is None:
        return None
    routing = pending_request.kwargs.get("routing")
    return routing if isinstance(routing, RoutingRequest) else None
