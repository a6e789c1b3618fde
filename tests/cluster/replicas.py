"""Ask the replicas of a deployed engine pool one by one, as the ingress does: a handle in
this process routes through fleetlm's request router, which knows the replicas by id and
takes a question to the one it names (`RoutingRequest.target`)."""

from __future__ import annotations

import time
from typing import Any

from fleetlm.cluster.router import RoutingRequest
from fleetlm.cluster.serve_router import routing_table

TIMEOUT_S = 60.0


def _handle(app: str, deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app)


def replica_ids(app: str, deployment: str = "LLMServer", count: int | None = None) -> list[str]:
    """The pool's replica ids (sorted), as its router knows them; with `count`, wait until
    it knows that many (replacements come up in the background)."""
    handle = _handle(app, deployment)
    handle.max_model_len.remote().result(timeout_s=TIMEOUT_S)  # makes this process's router
    table = routing_table(app, deployment)
    deadline = time.monotonic() + TIMEOUT_S
    while count is not None and len(table.replica_names()) != count:
        assert time.monotonic() < deadline, f"{app}/{deployment} never had {count} replicas"
        time.sleep(0.05)
    return sorted(table.replica_names())


def ask(app: str, replica: str, question: str, *args, deployment: str = "LLMServer") -> Any:
    """`LLMServer.ask` of one replica."""
    return _handle(app, deployment).ask.remote(
        question, *args, routing=RoutingRequest("", target=replica)).result(timeout_s=TIMEOUT_S)


def stats(app: str, deployment: str = "LLMServer") -> dict[str, Any]:
    """Each replica's `EngineStats`, by replica id."""
    return {r: ask(app, r, "stats", deployment=deployment)
            for r in replica_ids(app, deployment)}


def stream(app: str, replica: str, method: str, *args, deployment: str = "LLMServer"):
    """The items of a streaming method (`chat`, `completions`) of one replica."""
    handle = _handle(app, deployment).options(stream=True)
    return getattr(handle, method).remote(*args, routing=RoutingRequest("", target=replica))
