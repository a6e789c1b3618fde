"""Expert parallelism (EP): which rank holds which experts, and how tokens reach them.

With EP the experts of each MoE layer are spread over the EP group (the TP ranks of a
stage: TP x DP with DP = 1, since fleetlm's data parallelism is separate engine replicas),
each rank holding whole experts. `ExpertPlacement` maps global expert ids to ranks and local
indices (linear: contiguous ranges, the first `num_experts % ep_size` ranks one more; or
round-robin: expert e on rank e % ep_size).

Two ways to move tokens to their experts' ranks and back (`all2all_backend`):
- `allgather_reducescatter`: every EP rank sees every token (the all-gather of the ranks'
  tokens is the identity here: attention leaves the hidden states replicated over the TP
  ranks), computes its own experts' share, and the shares are summed back to every rank
  (reduce-scatter + all-gather, i.e. one all-reduce). Simple, but each rank's output is a
  full `[tokens, hidden]` sum.
- `all_to_all`: each rank takes a slice of the tokens, sends each (token, expert) pair's
  hidden state only to the rank holding that expert (`all_to_all_single` with uneven splits),
  which runs its experts on what it received and sends the results back; the origin weights
  and sums them, and the slices are all-gathered. Ranks with no tokens still take part in
  every collective, with empty splits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist

from fleetlm.parallel.group import ParallelGroup

ExpertsFn = Callable[..., torch.Tensor]  # moe.FusedExperts' signature


class ExpertPlacement:
    """Global expert id -> (rank, local index) over an EP group of `ep_size` ranks."""

    def __init__(self, num_experts: int, ep_size: int, strategy: str = "linear") -> None:
        if ep_size > num_experts:
            raise ValueError(f"expert parallelism over {ep_size} ranks needs at least as many "
                             f"experts; the model has {num_experts}")
        if strategy == "linear":
            base, extra = divmod(num_experts, ep_size)
            sizes = [base + (rank < extra) for rank in range(ep_size)]
            owner = [rank for rank, size in enumerate(sizes) for _ in range(size)]
        elif strategy == "round_robin":
            owner = [expert % ep_size for expert in range(num_experts)]
        else:
            raise ValueError(f"expert placement must be linear or round_robin; got {strategy!r}")
        self.num_experts, self.ep_size = num_experts, ep_size
        self.owner = torch.tensor(owner)
        local = [0] * num_experts
        counts = [0] * ep_size
        for expert, rank in enumerate(owner):
            local[expert], counts[rank] = counts[rank], counts[rank] + 1
        self.local_index = torch.tensor(local)

    def local_experts(self, rank: int) -> list[int]:
        """The global ids of `rank`'s experts, in local-index order."""
        return (self.owner == rank).nonzero()[:, 0].tolist()

    def expert_map(self, rank: int) -> torch.Tensor:
        """[num_experts]: the local index of each expert on `rank`, -1 where it lives elsewhere."""
        return torch.where(self.owner == rank, self.local_index, -1)


def combine_all_reduce(group: ParallelGroup, experts: ExpertsFn, x: torch.Tensor, w13, w2,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       expert_map: torch.Tensor) -> torch.Tensor:
    """`allgather_reducescatter`: this rank's experts on every token, summed over the group."""
    return group.all_reduce(experts(x, w13, w2, topk_weights, topk_ids, expert_map))


def exchange_all_to_all(group: ParallelGroup, experts: ExpertsFn, x: torch.Tensor, w13, w2,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        placement: ExpertPlacement) -> torch.Tensor:
    """`all_to_all`: this rank's slice of tokens goes to the ranks of its experts and back."""
    num_tokens, top_k = topk_ids.shape
    bounds = _slice_bounds(num_tokens, group.world_size)
    begin, end = bounds[group.rank], bounds[group.rank + 1]
    my_ids = topk_ids[begin:end].flatten()
    dest = placement.owner.to(my_ids.device)[my_ids]
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=group.world_size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group.group)
    send_split, recv_split = send_counts.tolist(), recv_counts.tolist()

    pair_tokens = begin + order // top_k
    send_rows = x[pair_tokens]
    send_local = placement.local_index.to(my_ids.device)[my_ids[order]]
    recv_rows = x.new_empty(sum(recv_split), x.shape[1])
    recv_local = send_local.new_empty(sum(recv_split))
    dist.all_to_all_single(recv_rows, send_rows, recv_split, send_split, group=group.group)
    dist.all_to_all_single(recv_local, send_local, recv_split, send_split, group=group.group)

    # Each received row is one (token, expert) pair: a "token" routed to one local expert.
    ones = torch.ones(recv_local.shape[0], 1, dtype=torch.float32, device=x.device)
    results = experts(recv_rows, w13, w2, ones, recv_local[:, None])
    returned = x.new_empty(send_rows.shape)
    dist.all_to_all_single(returned, results, send_split, recv_split, group=group.group)

    weights = topk_weights[begin:end].flatten()[order].to(x.dtype)[:, None]
    mine = torch.zeros(end - begin, x.shape[1], dtype=x.dtype, device=x.device)
    mine.index_add_(0, order // top_k, returned * weights)
    return _all_gather_slices(group, mine, bounds)


def _slice_bounds(num_tokens: int, world_size: int) -> list[int]:
    """Token slice boundaries of the ranks: sizes differ by at most one, the first larger."""
    base, extra = divmod(num_tokens, world_size)
    bounds = [0]
    for rank in range(world_size):
        bounds.append(bounds[-1] + base + (rank < extra))
    return bounds


def _all_gather_slices(group: ParallelGroup, mine: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """The ranks' slices (sizes from `bounds`) concatenated in rank order, on every rank."""
    width = max(b - a for a, b in itertools.pairwise(bounds))
    padded = mine.new_zeros(width, mine.shape[1])
    padded[: mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in range(group.world_size)]
    dist.all_gather(parts, padded, group=group.group)
    return torch.cat([part[: b - a] for part, (a, b) in zip(parts, itertools.pairwise(bounds))])
