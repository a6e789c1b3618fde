"""`LocalHandle`: the replica's own methods called as Serve's handle would call a replica's.

Every stream must run to its end (its `finally` is where a replica aborts and records a
request) and leave the routing table as it found it, whether the caller read it to the last
item, stopped after a whole response, or cancelled it midway.
"""

from __future__ import annotations

import asyncio

import pytest

from fleetlm.cluster.config import RouterSection
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.local_handle import LocalHandle
from fleetlm.cluster.migration import StreamChunk
from fleetlm.cluster.router import RoutingRequest
from fleetlm.cluster.serve_router import RoutingTable

REPLICA = "replica-1"


class Server:
    """What the ingress calls on an `LLMServer`, recording how each stream ended."""

    def __init__(self) -> None:
        self.ended: dict[str, str] = {}
        self.going_on = asyncio.Event()

    async def completions(self, body: dict, request_id: str, resume=None, routing=None):
        how = "closed"
        try:
            if body.get("stream"):
                for i in range(body["chunks"]):
                    yield StreamChunk(f"data: {i}\n\n", is_last=i == body["chunks"] - 1)
                    if body.get("hang"):
                        await asyncio.Event().wait()
            else:
                yield {"whole": True}
            how = "ran to its end"
        finally:
            self.ended[request_id] = how

    def ask(self, question: str, routing=None) -> str:
        return f"answer to {question}"


def _handle() -> tuple[LocalHandle, Server, RoutingTable]:
    server, table = Server(), RoutingTable(RouterSection())
    return LocalHandle(server, "app", "LLMServer", REPLICA, table), server, table


def _inflight(table: RoutingTable) -> int:
    return table.router.replica(REPLICA).num_inflight


def _call(handle: LocalHandle, request_id: str, body: dict):
    return handle.completions.remote(body, request_id, None,
                                     routing=RoutingRequest(request_id, "prompt"))


def test_a_whole_response_runs_to_its_end_after_its_only_item():
    async def run():
        handle, server, table = _handle()
        stream = _call(handle, "r1", {})
        assert await stream.__anext__() == {"whole": True}
        assert table.replica_of("r1") == REPLICA and _inflight(table) == 1
        await stream._ending  # the rest runs on its own, as in a replica
        return server.ended, _inflight(table)

    assert asyncio.run(run()) == ({"r1": "ran to its end"}, 0)


def test_a_stream_read_to_its_last_chunk_ends_and_is_counted_out():
    async def run():
        handle, server, table = _handle()
        stream = _call(handle, "r2", {"stream": True, "chunks": 3})
        texts = [(await stream.__anext__()).text for _ in range(3)]
        await stream._ending
        return texts, server.ended, _inflight(table)

    texts, ended, inflight = asyncio.run(run())
    assert texts == ["data: 0\n\n", "data: 1\n\n", "data: 2\n\n"]
    assert ended == {"r2": "ran to its end"} and inflight == 0


def test_a_cancelled_stream_is_closed_midway():
    async def run():
        handle, server, table = _handle()
        stream = _call(handle, "r3", {"stream": True, "chunks": 5, "hang": False})
        first = await stream.__anext__()
        stream.cancel()
        stream.cancel()  # idempotent, as Serve's
        await stream._ending
        return first.is_last, server.ended, _inflight(table)

    assert asyncio.run(run()) == (False, {"r3": "closed"}, 0)


def test_a_caller_cancelled_while_waiting_ends_the_stream_too():
    async def run():
        handle, server, table = _handle()
        stream = _call(handle, "r4", {"stream": True, "chunks": 5, "hang": True})
        await stream.__anext__()
        waiting = asyncio.ensure_future(stream.__anext__())  # the replica hangs
        await asyncio.sleep(0)
        waiting.cancel()  # the client went away
        await asyncio.gather(waiting, return_exceptions=True)
        return server.ended, _inflight(table)

    assert asyncio.run(run()) == ({"r4": "closed"}, 0)


def test_plain_methods_answer_as_awaitable_responses():
    async def run():
        handle, _, table = _handle()
        response = handle.options(stream=False).ask.remote(
            "is_healthy", routing=RoutingRequest("", target=REPLICA))
        return await response, table.replica_names(), _inflight(table)

    assert asyncio.run(run()) == ("answer to is_healthy", [REPLICA], 0)


def test_a_method_that_raises_leaves_nothing_in_flight():
    handle, _, table = _handle()
    with pytest.raises(AttributeError):
        handle.completions_that_do_not_exist.remote(routing=RoutingRequest("r6", "prompt"))
    assert _inflight(table) == 0


def test_errors_are_items_like_any_other():
    class Failing(Server):
        async def completions(self, body, request_id, resume=None, routing=None):
            yield OpenAIError(503, "engine died", code="engine_dead")

    async def run():
        table = RoutingTable(RouterSection())
        stream = LocalHandle(Failing(), "app", "LLMServer", REPLICA, table).completions.remote(
            {}, "r5", None, routing=RoutingRequest("r5", "prompt"))
        item = await stream.__anext__()
        await stream._ending
        return item.code, _inflight(table)

    assert asyncio.run(run()) == ("engine_dead", 0)
