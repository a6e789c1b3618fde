"""Keep a process's torch work on one OpenMP thread team.

GNU OpenMP (the runtime torch's CPU wheels and fleetlm's C kernels share) gives every thread
that starts a parallel region a team of its own, and the team's threads live as long as that
thread. Once the process holds more such threads than it has CPUs, libgomp cuts the spin that
a team's threads do between parallel regions from 300,000 iterations to 100, so each of the
hundreds of small regions of a decode step puts them to sleep and wakes them with a futex
(about 15 µs a region on 2 CPUs, measured in docs/benchmarks.md). A replica that loads its
model on one thread and steps it on another has two teams, and pays that on every token.

So one-time work (loading weights, profiling, allocating the KV cache) runs in a thread that
ends when it is done, which takes its team with it; the thread that steps is left the only one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` run in a new thread that ends with it; its result or exception."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"fleetlm-setup-{getattr(fn, '__name__', 'fn')}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
