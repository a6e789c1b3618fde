"""The fused-experts operation for CUDA: one Triton grouped GEMM, launched twice per layer.

The (token, expert) pairs are sorted by local expert and each expert's run is padded to a
multiple of BLOCK_M (`align_pairs`), so every program of the kernel multiplies BLOCK_M rows
that share one expert's weight: the first launch computes `gate_up = x[token] @ w13[e]^T` per
pair, the second `w2[e] @ (silu(gate) * up)` scaled by the pair's routing weight; the pairs of
a token are then summed. Pairs whose expert lives on another rank (`expert_map` -1) are left
out of the sort, so their rows stay zero. Same contract as `moe.fused_experts_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fleetlm.kernels.moe import group_by_expert
from fleetlm.kernels.triton_attention import dot_precision

BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 32


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, pair_ids_ptr, block_experts_ptr,
    N, K, num_pairs,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    PAIRS_PER_A_ROW: tl.constexpr, MUL_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[pair] = A[pair // PAIRS_PER_A_ROW] @ B[expert]^T (x weight[pair]) for the BLOCK_M
    pairs of this program, which all belong to `block_experts[program_id(0)]`."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ids_ptr + offs_m)
    is_pair = pair < num_pairs  # padding entries hold num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_row = (pair // PAIRS_PER_A_ROW).to(tl.int64)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + expert * stride_be + offs_n[None, :] * stride_bn
              + offs_k[:, None] * stride_bk)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=is_pair[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        weight = tl.load(weights_ptr + pair, mask=is_pair, other=0.0)
        acc = acc * weight[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=is_pair[:, None] & (offs_n[None, :] < N))


def align_pairs(topk_ids: torch.Tensor, num_local_experts: int,
                expert_map: torch.Tensor | None, block_m: int = BLOCK_M
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair ids sorted by local expert, each expert's run padded with `num_pairs` to a
    multiple of `block_m`; the local expert of each block of `block_m` entries)."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    order, counts, skipped = group_by_expert(topk_ids, num_local_experts, expert_map)
    counts_t = torch.tensor(counts, device=device)
    padded = (counts_t + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts_t, 0) - counts_t
    experts = torch.repeat_interleave(torch.arange(num_local_experts, device=device), counts_t)
    rank_in_expert = torch.arange(experts.numel(), device=device) - start[experts]
    pair_ids = torch.full((int(padded.sum()),), num_pairs, dtype=torch.int32, device=device)
    pair_ids[padded_start[experts] + rank_in_expert] = order[skipped:].to(torch.int32)
    block_experts = torch.repeat_interleave(
        torch.arange(num_local_experts, device=device, dtype=torch.int32), padded // block_m)
    return pair_ids, block_experts


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
                  pair_ids: torch.Tensor, block_experts: torch.Tensor, pairs_per_a_row: int,
                  mul_weight: bool) -> None:
    n, k = b.shape[1], b.shape[2]
    grid = (block_experts.numel(), triton.cdiv(n, BLOCK_N))
    _grouped_gemm_kernel[grid](
        a, b, out, weights, pair_ids, block_experts, n, k, out.shape[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1),
        PAIRS_PER_A_ROW=pairs_per_a_row, MUL_WEIGHT=mul_weight,
        DOT_PRECISION=dot_precision(b.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  expert_map: torch.Tensor | None = None) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    pair_ids, block_experts = align_pairs(topk_ids, w13.shape[0], expert_map)
    weights = topk_weights.flatten().float().contiguous()
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    if block_experts.numel() == 0:  # no pair for this rank's experts
        return torch.zeros_like(x)
    _grouped_gemm(x.contiguous(), w13, gate_up, weights, pair_ids, block_experts, top_k, False)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = (F.silu(gate) * up).contiguous()
    out = torch.zeros(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(hidden, w2, out, weights, pair_ids, block_experts, 1, True)
    return out.view(num_tokens, top_k, -1).sum(dim=1)
