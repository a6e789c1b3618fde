"""Drive a workload against a server under one arrival pattern, or a sweep of them.

Arrival patterns (`LoadPoint`):
- all at once (`request_rate=inf`) with at most `max_concurrency` requests in flight;
- Poisson at `request_rate` conversations per second: exponential gaps drawn from a generator
  seeded with `seed`, so a run is reproducible; a concurrency cap may be combined with it.
A conversation's turns are sent one after another, each as soon as the previous reply is in.
A request's send time is taken after it got its concurrency slot: time spent queued in the client
is not counted as server latency (as in vLLM bench).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import numpy as np
from tqdm import tqdm

from fleetlm.bench.client import (
    EndpointConfig,
    Message,
    RequestRecord,
    build_payload,
    make_session,
    send_request,
)
from fleetlm.bench.workloads import Conversation, Workload


@dataclass(frozen=True)
class LoadPoint:
    """One arrival pattern: `None` concurrency means no cap, `inf` rate means all at once."""

    max_concurrency: int | None = None
    request_rate: float = math.inf

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive, got {self.request_rate}")

    @property
    def label(self) -> str:
        parts = []
        if self.max_concurrency is not None:
            parts.append(f"concurrency {self.max_concurrency}")
        if math.isfinite(self.request_rate):
            parts.append(f"rate {self.request_rate:g}/s")
        return ", ".join(parts) or "all at once"


@dataclass
class RunResult:
    load: LoadPoint
    records: list[RequestRecord]
    duration_s: float  # from the first arrival to the last reply
    max_in_flight: int  # the most requests the client had in flight at once


def arrival_offsets(num_arrivals: int, request_rate: float, seed: int) -> list[float]:
    """Start offsets (s) of a Poisson process: the first at 0, gaps exponential, mean 1/rate."""
    if math.isinf(request_rate):
        return [0.0] * num_arrivals
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_arrivals)
    return np.concatenate(([0.0], np.cumsum(gaps[:-1]))).tolist()[:num_arrivals]


class _Limiter:
    """Concurrency cap (none when `max_concurrency` is None) that also counts requests in flight."""

    def __init__(self, max_concurrency: int | None) -> None:
        self._semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.num_in_flight = 0
        self.max_in_flight = 0

    async def __aenter__(self) -> None:
        if self._semaphore is not None:
            await self._semaphore.acquire()
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)

    async def __aexit__(self, *exc_info) -> None:
        self.num_in_flight -= 1
        if self._semaphore is not None:
            self._semaphore.release()


class _Runner:
    """Runs the conversations of one load point in one HTTP session."""

    def __init__(self, config: EndpointConfig, session, limiter: _Limiter, progress) -> None:
        self._config = config
        self._session = session
        self._limiter = limiter
        self._progress = progress

    async def conversation(self, conv: Conversation) -> list[RequestRecord]:
        messages: list[Message] = []
        if conv.system_prompt is not None:
            messages.append({"role": "system", "content": conv.system_prompt})
        num_context_tokens = conv.num_system_tokens
        records = []
        for turn_index, turn in enumerate(conv.turns):
            messages.append({"role": "user", "content": turn.text})
            num_context_tokens += turn.num_tokens
            record = RequestRecord(conv.conv_id, turn_index, turn.max_tokens, num_context_tokens)
            if records and not records[-1].is_success:
                record.error = "skipped: an earlier turn of this conversation failed"
            else:
                await self._send(messages, turn, record)
            records.append(record)
            messages.append({"role": "assistant", "content": record.text})
            num_context_tokens += record.usage_completion_tokens or sum(record.chunk_num_tokens)
        return records

    async def _send(self, messages, turn, record: RequestRecord) -> None:
        payload = build_payload(self._config, messages, turn)
        async with self._limiter:
            await send_request(self._session, self._config, payload, record)
        self._progress.update(1)


async def run_load_point(
    session: aiohttp.ClientSession,
    config: EndpointConfig,
    workload: Workload,
    load: LoadPoint,
    seed: int = 0,
    is_progress_shown: bool = False,
) -> RunResult:
    """Send every conversation of `workload` under `load`; records come back in workload order."""
    limiter = _Limiter(load.max_concurrency)
    offsets = arrival_offsets(len(workload.conversations), load.request_rate, seed)
    with tqdm(total=workload.num_requests, desc=load.label, disable=not is_progress_shown) as bar:
        runner = _Runner(config, session, limiter, bar)
        start = time.perf_counter()
        tasks = []
        for conv, offset in zip(workload.conversations, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(runner.conversation(conv)))
        per_conversation = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    records = [record for conv_records in per_conversation for record in conv_records]
    return RunResult(load, records, duration, limiter.max_in_flight)


async def run_warmup(
    session: aiohttp.ClientSession, config: EndpointConfig, workload: Workload, num_warmups: int
) -> RunResult:
    """Send the first turn of the first `num_warmups` conversations at once (opens connections)."""
    warmup = Workload(
        workload.config,
        tuple(Conversation(c.conv_id, c.turns[:1], c.system_prompt, c.num_system_tokens)
              for c in workload.conversations[:num_warmups]),
        workload.prompt_source,
    )
    return await run_load_point(session, config, warmup, LoadPoint())


async def run_sweep(
    config: EndpointConfig,
    workload: Workload,
    loads: Sequence[LoadPoint],
    seed: int = 0,
    num_warmups: int = 0,
    is_progress_shown: bool = False,
) -> list[RunResult]:
    """Warm up once, then run the same workload at each load point in turn, in one HTTP session
    (connections are kept alive from one request, and one point, to the next)."""
    async with make_session(config) as session:
        if num_warmups > 0:
            await run_warmup(session, config, workload, num_warmups)
        return [
            await run_load_point(session, config, workload, load, seed, is_progress_shown)
            for load in loads
        ]
