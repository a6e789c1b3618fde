"""Random MoE layer inputs shared by the CPU tests and the Triton interpreter cases."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoEInputs:
    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor

    def args(self):
        return self.x, self.w13, self.w2, self.topk_weights, self.topk_ids


def moe_inputs(num_tokens: int, num_experts: int = 8, top_k: int = 2, hidden: int = 32,
               intermediate: int = 24, dtype=torch.float32, seed: int = 0,
               only_expert: int | None = None) -> MoEInputs:
    """Random tokens routed by a random router; `only_expert` sends every token's first
    choice to that expert."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=gen) / intermediate**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if only_expert is not None:
        logits[:, only_expert] += 100.0
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return MoEInputs(x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)
