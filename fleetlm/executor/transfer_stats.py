"""Counters of a decode engine's KV loads, kept by its scheduler (no torch, no I/O).

The scheduler is where every asynchronous load starts, completes and fails, whatever runs
the bytes (one rank or a worker group), so it is where they are counted: loads, blocks,
latency from admission to arrival, failures by cause (the `TransferError` reason before the
first ':' of the connector's message: timeout, unreachable, corrupt, expired, ...).
`Histogram` is also the serving layer's (fleetlm.cluster.metrics).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from typing import Any

# Seconds from a request's admission (blocks allocated) to its KV having arrived.
TRANSFER_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Histogram:
    """Per-bucket (not cumulative) counts; the last slot is the +Inf bucket."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = <=).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class TransferStats:
    def __init__(self) -> None:
        self.num_loads_done = 0
        self.num_blocks_loaded = 0
        self.failures_by_cause: dict[str, int] = {}
        self.latency = Histogram(TRANSFER_LATENCY_BUCKETS)
        self._started: dict[str, tuple[float, int]] = {}  # request id -> (start, blocks)

    def on_start(self, request_id: str, num_blocks: int) -> None:
        self._started[request_id] = (time.monotonic(), num_blocks)

    def on_done(self, request_id: str) -> None:
        started = self._started.pop(request_id, None)
        if started is not None:
            self.num_loads_done += 1
            self.num_blocks_loaded += started[1]
            self.latency.observe(time.monotonic() - started[0])

    def on_failed(self, request_id: str, reason: str) -> None:
        if self._started.pop(request_id, None) is not None:
            cause = reason.split(":", 1)[0].strip() or "unknown"
            self.failures_by_cause[cause] = self.failures_by_cause.get(cause, 0) + 1

    def forget(self, request_id: str) -> None:
        """The request ended while loading (aborted): neither done nor failed."""
        self._started.pop(request_id, None)
