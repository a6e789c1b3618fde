"""The async API: many concurrent callers stream outputs while one background thread steps.

Threads: callers live on an asyncio event loop; the engine loop runs in its own thread (torch
releases the GIL in its kernels, so the event loop stays responsive). The two meet in two
places only: a command queue into the engine thread (add, abort) and `call_soon_threadsafe`
back out, once per engine step and event loop, delivering that step's outputs to their
callers' queues (a wake-up per request per step would cost the loop a callback each).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.engine import LLMEngine
from fleetlm.executor.openmp import in_passing_thread
from fleetlm.executor.outputs import RequestOutput, coalesce
from fleetlm.executor.protocol import EngineStats
from fleetlm.executor.request import Request
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.executor.scheduler import SchedulerQueueFullError

logger = logging.getLogger("fleetlm.async_engine")

# The engine thread gives the GIL up around every torch op and must get it back at once; with
# Python's default 5 ms switch interval a busy event-loop thread (streaming, serialization)
# holds it long enough to stall every step. Measured in docs/benchmarks.md.
_GIL_SWITCH_INTERVAL_S = 0.0002


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _RequestError:
    """An error that ends one request (queue full, duplicate id), not the engine."""

    error: Exception


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """Implements `fleetlm.executor.protocol.EngineClient`."""

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None) -> None:
        # built in a thread of its own, so that the engine thread owns the only OpenMP team
        self.engine = engine or in_passing_thread(LLMEngine, config)
        self.model_name = config.model.model
        self.max_model_len = self.engine.max_model_len
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._failure: BaseException | None = None  # of the workers, reported between steps
        self._is_stopped = False
        self.engine.executor.add_failure_listener(self._on_executor_failure)
        self.engine.core.add_transfer_listener(self._wakeup.set)
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run_loop, name="fleetlm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(config)

    # ---- caller side (event loop) ----------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str, priority: int = 0,
                       resume_token_ids: list[int] | None = None,
                       kv_transfer_params: dict | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise EngineDeadError("the engine loop has stopped") from self._error
        requests = self.engine.make_requests(request_id, prompt, sampling_params, priority,
                                             resume_token_ids, kv_transfer_params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = self._streams[request_id] = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._send(("add", request_id, prompt if isinstance(prompt, str) else None, requests))
        finished = False
        try:
            while not finished:
                out = await self._next_output(stream.queue)
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    @staticmethod
    async def _next_output(q: asyncio.Queue) -> RequestOutput:
        """Everything queued, as one output: a slow reader skips stale cumulative outputs and
        gets queued deltas concatenated."""
        out = await q.get()
        while not q.empty() and isinstance(out, RequestOutput) and not out.finished:
            later = q.get_nowait()
            out = coalesce(out, later) if isinstance(later, RequestOutput) else later
        if isinstance(out, _RequestError):
            raise out.error
        if isinstance(out, BaseException):
            raise EngineDeadError("the engine loop has stopped") from out
        return out

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, as `generate` would make them."""
        return self.engine.input_processor.tokenize(prompt)

    def kv_events_since(self, engine_id: str | None = None, seq: int = 0) -> dict:
        """What this engine's prefix cache cached and evicted after batch `seq` (or a
        snapshot); see `fleetlm.executor.kv_events`. Any thread; needs enable_kv_events."""
        return self.engine.kv_events_since(engine_id, seq)

    def kv_events_unseen(self, cursors: Mapping[str, int]) -> dict | None:
        """The batches of KV events a router with `cursors` has not seen (None: it must
        ask `kv_events_since`); any thread. See `LLMEngine.kv_events_unseen`."""
        return self.engine.kv_events_unseen(cursors)

    def num_cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading tokens of `token_ids` whose KV this engine's prefix cache holds now."""
        return self.engine.num_cached_prefix_tokens(token_ids)

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self._failure is None and self._thread.is_alive()

    async def shutdown(self) -> None:
        self._is_stopped = True
        self._wakeup.set()
        self.engine.core.wake()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self.engine.shutdown)

    def _on_executor_failure(self, error: BaseException) -> None:
        """Called from the executor's threads when a worker dies: unhealthy at once, and the
        engine loop wakes to fail every stream."""
        self._failure = error
        self._wakeup.set()

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()
        self.engine.core.wake()  # a step waiting for KV transfers

    # ---- engine side (background thread) -----------------------------------------------------
    def _run_loop(self) -> None:
        try:
            while not self._is_stopped:
                self._drain_commands()
                if self._failure is not None:
                    raise self._failure
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                self._publish(self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - every caller must hear of it
            logger.exception("engine loop died")
            self._error = exc
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, requests = command
                self._add(request_id, prompt, requests)
            else:
                self.engine.abort_request(command[1])

    def _add(self, request_id: str, prompt: str | None, requests: list[Request]) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return  # the caller went away before the engine saw the request
        try:
            self.engine.add_requests(request_id, prompt, requests)
        except (ValueError, SchedulerQueueFullError) as exc:  # this request's, not the engine's
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _RequestError(exc))

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """One wake-up per event loop for all of this step's outputs."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_deliver, deliveries)


def _deliver(deliveries: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in deliveries:
        q.put_nowait(out)
