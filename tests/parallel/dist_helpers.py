"""Run a function on every rank of a real gloo worker group made of spawned processes."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

from fleetlm.parallel.state import ParallelLayout, distributed_environment

TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, layout: ParallelLayout, init_method: str, fn: Callable, args: tuple,
           results: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        with distributed_environment(layout, rank, init_method, "gloo") as groups:
            # Pickled here, by value: a tensor sent through a multiprocessing queue as is
            # would be shared memory owned by this process, which is about to exit.
            results.put((rank, pickle.dumps(fn(groups, *args)), None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, None, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], *args, tp: int = 1, pp: int = 1) -> list[Any]:
    """`fn(groups, *args)` on each rank of a tp x pp group; the results in rank order.

    `fn` must be importable (a module-level function of a test module)."""
    layout = ParallelLayout(tp, pp)
    context = mp.get_context("spawn")
    results = context.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    processes = [context.Process(target=_entry, args=(rank, layout, init_method, fn, args,
                                                      results))
                 for rank in range(layout.world_size)]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    try:
        for _ in processes:
            rank, value, error = results.get(timeout=TIMEOUT_S)
            if error is not None:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            collected[rank] = pickle.loads(value)
    except queue.Empty:
        raise AssertionError(f"ranks {set(range(len(processes))) - set(collected)} hung") from None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(layout.world_size)]
