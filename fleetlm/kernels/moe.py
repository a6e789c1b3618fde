"""Mixture-of-experts: routing and the fused-experts operation, with their torch references.

Expert weights, one layer, this rank's experts stacked:
`w13 [num_local_experts, 2 * intermediate, hidden]` (gate rows, then up rows) and
`w2 [num_local_experts, hidden, intermediate]`. Each token goes to `top_k` experts
(`topk_ids [tokens, top_k]`, global expert ids) with `topk_weights [tokens, top_k]`; expert e
computes `w2[e] @ (silu(gate) * up)` and the token's output is the weighted sum over its
experts. `expert_map [num_experts]` (expert parallelism) gives each global expert's local index
on this rank, or -1 where another rank holds it: those pairs contribute nothing here, and the
caller sums the ranks' partial outputs.

Dispatch by device: CUDA runs the Triton kernel (`triton_moe`); CPU groups the (token, expert)
pairs by expert and runs each expert's two GEMMs once per step on all its rows (oneDNN with
prepacked weights, as the dense layers); `fused_experts_reference` is the plain definition, a
loop over tokens, public so tests compare against it. `per_expert_loop` is transformers' own
way (a loop over experts with a mask per expert), kept as the benchmark's baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fleetlm.kernels.cpu_linear import PackedLinear


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, the `top_k` largest, optionally renormalised to sum to 1.
    Returns (float32 weights, int64 expert ids), each `[tokens, top_k]`."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, token by token and expert by expert (slow; for tests)."""
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for weight, expert in zip(topk_weights[token].tolist(), topk_ids[token].tolist()):
            local = expert if expert_map is None else int(expert_map[expert])
            if local < 0:
                continue
            gate, up = F.linear(x[token], w13[local]).chunk(2)
            out[token] += weight * F.linear(F.silu(gate) * up, w2[local])
    return out


def per_expert_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """transformers' MoE loop (one mask and one gather per expert hit), the baseline that
    `benchmarks/moe_layer.py` measures the fused path against."""
    out = torch.zeros_like(x)
    mask = F.one_hot(topk_ids, num_classes=w13.shape[0]).permute(2, 1, 0)
    for expert in (mask.sum(dim=(-1, -2)) > 0).nonzero()[:, 0].tolist():
        position, token = torch.where(mask[expert])
        gate, up = F.linear(x[token], w13[expert]).chunk(2, dim=-1)
        rows = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[token, position, None]
        out.index_add_(0, token, rows.to(out.dtype))
    return out


def group_by_expert(topk_ids: torch.Tensor, num_local_experts: int,
                    expert_map: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int], int]:
    """The (token, expert) pairs ordered by local expert: (order, rows per local expert,
    pairs skipped), where `order` indexes `topk_ids.flatten()` and starts with the skipped
    pairs (experts of other ranks). One sort and one host sync per step."""
    local = topk_ids.flatten()
    if expert_map is not None:
        local = expert_map[local]
    order = torch.argsort(local, stable=True)
    # bincount of local + 1 puts the pairs of other ranks (-1) in bucket 0.
    counts = torch.bincount(local + 1, minlength=num_local_experts + 1).tolist()
    return order, counts[1:], counts[0]


class CpuFusedExperts:
    """The CPU path: each local expert's rows gathered once, two GEMMs per expert hit,
    weighted and summed into the tokens with one `index_add_`. Holds the packed weights of
    each expert (`PackedLinear`), so it belongs to one layer."""

    def __init__(self, num_local_experts: int) -> None:
        self.gate_up = [PackedLinear() for _ in range(num_local_experts)]
        self.down = [PackedLinear() for _ in range(num_local_experts)]

    def __call__(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 expert_map: torch.Tensor | None = None) -> torch.Tensor:
        top_k = topk_ids.shape[1]
        order, counts, start = group_by_expert(topk_ids, w13.shape[0], expert_map)
        order = order[start:]  # pairs of this rank's experts only
        tokens = order // top_k
        rows = x[tokens]
        out_rows = torch.empty_like(rows)
        begin = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = begin + count
            # One row: MKL's GEMV reads the weight faster than oneDNN's packed layout (18.6 vs
            # 26.5 ms for 16 experts of Qwen3-30B-A3B's shape); from two rows packed wins.
            gate_up, down = ((F.linear, F.linear) if count == 1
                             else (self.gate_up[expert], self.down[expert]))
            gate, up = gate_up(rows[begin:end], w13[expert]).chunk(2, dim=-1)
            out_rows[begin:end] = down(F.silu(gate).mul_(up), w2[expert])
            begin = end
        out_rows.mul_(topk_weights.flatten()[order].to(out_rows.dtype)[:, None])
        return torch.zeros_like(x).index_add_(0, tokens, out_rows)


class FusedExperts:
    """`fused_experts(x, w13, w2, topk_weights, topk_ids, expert_map)` for one layer, on the
    device of `x`: the Triton kernel on CUDA, `CpuFusedExperts` elsewhere."""

    def __init__(self, num_local_experts: int) -> None:
        self.cpu = CpuFusedExperts(num_local_experts)

    def __call__(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 expert_map: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        if x.device.type == "cuda":
            from fleetlm.kernels import triton_moe

            return triton_moe.fused_experts(x, w13, w2, topk_weights, topk_ids, expert_map)
        return self.cpu(x, w13, w2, topk_weights, topk_ids, expert_map)
