"""Pipeline parallelism: which layers each stage holds, and the hand-over of the hidden state
and residual from one stage to the next."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from fleetlm.parallel.group import ParallelGroup


def stage_layer_counts(num_layers: int, num_stages: int,
                       partition: Sequence[int] | None = None) -> list[int]:
    """Layers per stage: `partition` when given (checked), else an even split with the
    remainder on the first stages (the last stage also projects logits and samples)."""
    if partition is not None:
        counts = list(partition)
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(
                f"pipeline layer partition {counts} must give each of the {num_stages} stages "
                f"at least one layer and sum to the model's {num_layers} layers")
        return counts
    if num_stages > num_layers:
        raise ValueError(f"pipeline_parallel_size {num_stages} exceeds the model's "
                         f"{num_layers} layers")
    base, extra = divmod(num_layers, num_stages)
    return [base + (stage < extra) for stage in range(num_stages)]


def stage_layer_range(num_layers: int, pp: ParallelGroup,
                      partition: Sequence[int] | None = None) -> range:
    """The global indices of the layers stage `pp.rank` holds."""
    counts = stage_layer_counts(num_layers, pp.world_size, partition)
    start = sum(counts[: pp.rank])
    return range(start, start + counts[pp.rank])


class StageHandoff:
    """Sends (hidden, residual) to the next stage and receives them from the previous one.

    The send is asynchronous, so a stage starts its next batch while the previous one travels;
    the buffer is kept until the next send, which first waits for it."""

    def __init__(self, pp: ParallelGroup) -> None:
        self.pp = pp
        self._in_flight: tuple[object, torch.Tensor] | None = None
        self.recv_wait_s = 0.0  # time spent waiting for the previous stage (the bubble)

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        self.wait()
        stacked = torch.stack((hidden, residual))
        self._in_flight = (self.pp.send(stacked, self.pp.rank + 1), stacked)

    def recv(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = torch.empty((2, num_tokens, hidden_size), dtype=dtype, device=device)
        started = time.perf_counter()
        self.pp.recv(stacked, self.pp.rank - 1)
        self.recv_wait_s += time.perf_counter() - started
        return stacked[0], stacked[1]

    def wait(self) -> None:
        if self._in_flight is not None:
            self._in_flight[0].wait()
            self._in_flight = None
