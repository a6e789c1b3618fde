"""The async API: many concurrent callers stream outputs while the engine steps elsewhere.

The engine loop (engine_loop.py) runs in its own process by default, so the serving threads of
this process (Ray, Serve, the event loop) never hold the GIL it needs between torch ops; a test
may instead hand in an engine, which then runs in a thread of this process. Either way this
side validates and tokenizes requests itself, sends commands down one pipe and reads outputs
from another in a reader thread, which hands each output to its caller's asyncio queue with
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Listener
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.engine import LLMEngine
from fleetlm.executor.engine_loop import EngineInfo, EngineLoop
from fleetlm.executor.input_processor import InputProcessor
from fleetlm.executor.outputs import RequestOutput
from fleetlm.executor.protocol import EngineStats
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.executor.weights import load_tokenizer


_AUTHKEY_BYTES = 32
_START_POLL_S = 0.5


class EngineDeadError(RuntimeError):
    pass


class _EngineProcess:
    """The engine loop in a fresh interpreter that connects back to `address`."""

    def __init__(self, address: str, authkey: bytes) -> None:
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "fleetlm.executor.engine_loop", address],
            stdin=subprocess.PIPE, text=True)
        self._popen.stdin.write(authkey.hex() + "\n")
        self._popen.stdin.close()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self) -> None:
        self._popen.wait()


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
        self.model_name = config.model.model
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stats = EngineStats()
        self._send_lock = threading.Lock()
        self._start_engine(config, engine)
        info = self._wait_until_ready()
        self.max_model_len = info.max_model_len
        self.tokenizer = load_tokenizer(info.model_dir)
        self.input_processor = InputProcessor(self.tokenizer, info.max_model_len,
                                              info.vocab_size, info.eos_token_id)
        self._reader = threading.Thread(target=self._read_outputs, name="fleetlm-outputs",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(config)

    def _start_engine(self, config: EngineConfig, engine: LLMEngine | None) -> None:
        if engine is not None:
            engine_end, self._connection = multiprocessing.Pipe()
            self._worker = threading.Thread(
                target=EngineLoop(engine, engine_end, engine_end).run, name="fleetlm-engine",
                daemon=True)
            self._worker.start()
            return
        authkey = os.urandom(_AUTHKEY_BYTES)
        with Listener(family="AF_UNIX", authkey=authkey) as listener:
            self._worker = _EngineProcess(listener.address, authkey)
            self._connection = self._accept(listener)
        self._connection.send(config)

    def _accept(self, listener: Listener):
        """Wait for the engine process to connect, or to die trying."""
        accepted = []
        waiter = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        waiter.start()
        while waiter.is_alive() and self._worker.is_alive():
            waiter.join(_START_POLL_S)
        if not accepted:
            raise EngineDeadError("the engine process exited before connecting")
        return accepted[0]

    def _wait_until_ready(self) -> EngineInfo:
        try:
            message = self._connection.recv()
        except EOFError as exc:
            raise EngineDeadError("the engine process exited while starting") from exc
        if message[0] != "ready":
            raise EngineDeadError("the engine failed to start") from message[1]
        return message[1]

    # ---- caller side (event loop) ----------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str, priority: int = 0) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise EngineDeadError("the engine loop has stopped") from self._error
        prompt_token_ids = self.input_processor.tokenize(prompt)
        requests = self.input_processor.make_requests(request_id, prompt_token_ids,
                                                      sampling_params, priority)
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
        """The newest output: outputs are cumulative, so a slow reader skips stale ones."""
        out = await q.get()
        while not q.empty() and isinstance(out, RequestOutput) and not out.finished:
            out = q.get_nowait()
        if isinstance(out, _RequestError):
            raise out.error
        if isinstance(out, BaseException):
            raise EngineDeadError("the engine loop has stopped") from out
        return out

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self._worker.is_alive()

    async def shutdown(self) -> None:
        if self._worker.is_alive():
            self._send(("shutdown",))
        await asyncio.to_thread(self._worker.join)
        await asyncio.to_thread(self._reader.join)

    def _send(self, command: tuple) -> None:
        with self._send_lock:  # one pipe, many callers
            try:
                self._connection.send(command)
            except (BrokenPipeError, OSError) as exc:
                self._error = self._error or exc

    # ---- reader thread -----------------------------------------------------------------------
    def _read_outputs(self) -> None:
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):  # the engine shut down or died
                self._fail(EngineDeadError("the engine exited"))
                return
            kind = message[0]
            if kind == "outputs":
                self._stats = message[2]
                for out in message[1]:
                    self._deliver(out.request_id, out)
            elif kind == "stats":
                self._stats = message[1]
            elif kind == "request_error":
                self._deliver(message[1], _RequestError(message[2]))
            else:  # "dead"
                self._fail(message[1])
                return

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
