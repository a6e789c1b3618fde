"""One dimension of parallelism (tensor, pipeline, expert) as the layers see it, and the
collectives they call. Every collective is a no-op at world size 1, so single-process code
pays nothing for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroup:
    """A process group seen from one member: its rank in the group, the group's size and the
    global ranks of the members in group-rank order (send/recv address global ranks)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when world_size > 1
    ranks: tuple[int, ...] = (0,)

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The sum over the group of `x`, split along `dim`; this rank keeps its part.

        gloo has no reduce_scatter: there it is an all-reduce followed by taking the part."""
        if self.world_size == 1:
            return x
        if x.shape[dim] % self.world_size:
            raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over "
                             f"{self.world_size} ranks")
        if dist.get_backend(self.group) == "gloo":
            return self.all_reduce(x.clone()).chunk(self.world_size, dim)[self.rank].contiguous()
        parts = [p.contiguous() for p in x.chunk(self.world_size, dim)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=self.group)
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank `src`'s `x` on every rank, in place."""
        if self.world_size == 1:
            return x
        dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def send(self, x: torch.Tensor, dst: int):
        """Start sending `x` to group rank `dst`; returns the work handle to wait on."""
        return dist.isend(x.contiguous(), dst=self.ranks[dst], group=self.group)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into `x` from group rank `src` (blocks until it arrives)."""
        dist.recv(x, src=self.ranks[src], group=self.group)
        return x


SINGLE_PROCESS = ParallelGroup()
