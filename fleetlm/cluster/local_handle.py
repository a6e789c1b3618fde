"""A deployment handle to the replica the caller runs in (`http.ingress: in_replica`).

`OpenAIIngress` talks to engine replicas through Serve's `DeploymentHandle`: `.options(...)`,
`handle.chat.remote(...)` as a stream it iterates and may cancel, `handle.ask.remote(...)`
as a response it awaits. When the routes run in the engine replica itself, `LocalHandle`
answers the same calls by calling the replica's own `LLMServer` methods on this event loop:
no Serve hop, no serialization, no second process. It records each request in the routing
table as Serve's router would (`on_routed` / `on_completed`), so the ingress names the
replica in `x-fleetlm-replica`, /health and /metrics as it does with a separate ingress.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from fleetlm.cluster.migration import StreamChunk
from fleetlm.cluster.serve_router import RoutingTable

logger = logging.getLogger(__name__)


class LocalHandle:
    def __init__(self, server: Any, app_name: str, deployment_name: str, replica: str,
                 table: RoutingTable) -> None:
        """`server`: the replica's `LLMServer`; `replica`: Serve's id of this replica, the one
        name `table` (this deployment's routing table in this process) lists."""
        self.server, self.app_name, self.deployment_name = server, app_name, deployment_name
        self.replica, self.table = replica, table
        table.set_replicas([replica])
        self._num_calls = 0

    def options(self, **_: Any) -> LocalHandle:
        """Serve's call options (streaming, by reference) mean nothing in-process."""
        return self

    def __getattr__(self, method: str) -> _LocalMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _LocalMethod(self, method)

    def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        self._num_calls += 1
        call_id = f"local-{self._num_calls}"
        self.table.on_routed(call_id, self.replica, kwargs.get("routing"))
        try:
            result = getattr(self.server, method)(*args, **kwargs)
        except BaseException:  # raised at the call, as a replica's would be at the await
            self.table.on_completed(call_id)
            raise
        if inspect.isasyncgen(result):
            return _LocalStream(result, lambda: self.table.on_completed(call_id))
        self.table.on_completed(call_id)
        return _LocalResponse(result)


class _LocalMethod:
    def __init__(self, handle: LocalHandle, name: str) -> None:
        self.handle, self.name = handle, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.handle._call(self.name, args, kwargs)


class _LocalStream:
    """A replica method's async generator, iterated and cancelled as Serve's
    `DeploymentResponseGenerator` is. As in a replica, the generator always runs to its end
    (its `finally` aborts what is left and records the request's metrics): after the item
    that ends the stream (server.py's contract) the rest runs in a task of its own, and a
    cancelled stream is closed."""

    def __init__(self, generator, on_end) -> None:
        self.generator, self.on_end = generator, on_end
        self._ending: asyncio.Task | None = None

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self.generator.__anext__()
        except BaseException:  # ended, failed or cancelled: it yields nothing more
            self.on_end()
            raise
        if not isinstance(item, StreamChunk) or item.is_last:  # nothing follows
            self._end_with(self._drain())
        return item

    def cancel(self) -> None:
        """Close the generator unless it is ending already. Called from the caller's task
        between items, never during one."""
        self._end_with(self.generator.aclose())

    def _end_with(self, ending) -> None:
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._end(ending))
        else:
            ending.close()  # a coroutine never awaited

    async def _drain(self) -> None:
        async for _ in self.generator:
            pass

    async def _end(self, ending) -> None:
        try:
            await ending
        except Exception:  # noqa: BLE001 - the client has its answer; log what is left
            logger.exception("a local stream failed while ending")
        finally:
            self.on_end()


class _LocalResponse:
    """A plain method's result (or coroutine), awaited as Serve's `DeploymentResponse`."""

    def __init__(self, result: Any) -> None:
        self.future = asyncio.ensure_future(result) if inspect.isawaitable(result) else None
        self.result = result

    def __await__(self):
        if self.future is None:
            return self.result
            yield  # a generator: `await` takes its return value
        return (yield from self.future.__await__())

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()
