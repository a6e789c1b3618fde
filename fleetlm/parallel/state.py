"""Process groups of one worker group: world, tensor-parallel (TP), pipeline-parallel (PP) and
expert-parallel (EP), built once per worker from its rank, the world size and a rendezvous
address the driver hands out.

Rank layout (vLLM's): `rank = pp_rank * tp_size + tp_rank`, so the TP ranks of one stage are
neighbours (one node, where NCCL's all-reduce is fastest). The EP group spans TP x DP ranks;
with one replica per worker group (DP = 1) it has the TP group's members.

The only process-wide state is torch.distributed's own default group, owned by
`distributed_environment`, a context that refuses to nest.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fleetlm.parallel.group import SINGLE_PROCESS, ParallelGroup

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class ParallelLayout:
    """Where each global rank sits: its pipeline stage and its place in the stage."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The rank that returns sampled tokens: TP rank 0 of the last stage."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tensor_parallel_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def tp_group_ranks(self, pp_rank: int) -> tuple[int, ...]:
        start = pp_rank * self.tensor_parallel_size
        return tuple(range(start, start + self.tensor_parallel_size))

    def pp_group_ranks(self, tp_rank: int) -> tuple[int, ...]:
        return tuple(range(tp_rank, self.world_size, self.tensor_parallel_size))


@dataclass(frozen=True)
class ProcessGroups:
    """One worker's view of every parallel dimension."""

    world: ParallelGroup = SINGLE_PROCESS
    tp: ParallelGroup = SINGLE_PROCESS
    pp: ParallelGroup = SINGLE_PROCESS
    ep: ParallelGroup = SINGLE_PROCESS

    @property
    def is_output_rank(self) -> bool:
        return self.pp.is_last_rank and self.tp.is_first_rank


SINGLE_PROCESS_GROUPS = ProcessGroups()


def choose_backend(configured: str, device: torch.device) -> str:
    """`configured` unless it is "auto": NCCL for CUDA devices, gloo for CPUs."""
    if configured not in BACKENDS:
        raise ValueError(f"parallel backend must be one of {', '.join(BACKENDS)}; "
                         f"got {configured!r}")
    if configured != "auto":
        return configured
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def distributed_environment(layout: ParallelLayout, rank: int, init_method: str,
                            backend: str, timeout_s: float = 600.0) -> Iterator[ProcessGroups]:
    """Join the worker group (every rank calls this with the same layout and `init_method`,
    e.g. "tcp://10.0.0.1:29500") and yield this rank's groups; destroy them on exit."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a worker group; "
                           "one distributed environment per process")
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=layout.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield _build_groups(layout, rank)
    finally:
        dist.destroy_process_group()


def _build_groups(layout: ParallelLayout, rank: int) -> ProcessGroups:
    # new_group is collective over the whole world: every rank creates every group, in the
    # same order, and keeps the ones it belongs to.
    tp_rank, pp_rank = layout.tp_rank(rank), layout.pp_rank(rank)
    tp = pp = None
    for stage in range(layout.pipeline_parallel_size):
        group = _group(layout.tp_group_ranks(stage), rank)
        tp = group if stage == pp_rank else tp
    for column in range(layout.tensor_parallel_size):
        group = _group(layout.pp_group_ranks(column), rank)
        pp = group if column == tp_rank else pp
    world = ParallelGroup(rank, layout.world_size, dist.group.WORLD,
                          tuple(range(layout.world_size)))
    return ProcessGroups(world=world, tp=tp, pp=pp, ep=tp)


def _group(ranks: tuple[int, ...], rank: int) -> ParallelGroup:
    handle = dist.new_group(list(ranks)) if len(ranks) > 1 else None
    if rank not in ranks:
        return SINGLE_PROCESS
    return ParallelGroup(ranks.index(rank), len(ranks), handle, ranks)
