"""The fused-experts operation and routing against their plain definitions."""

from __future__ import annotations

import pytest
import torch
from moe_cases import moe_inputs

from fleetlm.kernels.moe import (
    CpuFusedExperts,
    FusedExperts,
    fused_experts_reference,
    group_by_expert,
    per_expert_loop,
    select_experts,
)
from fleetlm.parallel.experts import ExpertPlacement

TOKEN_COUNTS = pytest.mark.parametrize("num_tokens", [1, 5, 64])


@TOKEN_COUNTS
def test_cpu_path_matches_reference(num_tokens):
    inputs = moe_inputs(num_tokens)
    expected = fused_experts_reference(*inputs.args())
    torch.testing.assert_close(CpuFusedExperts(8)(*inputs.args()), expected)
    torch.testing.assert_close(per_expert_loop(*inputs.args()), expected)


def test_every_token_on_one_expert():
    inputs = moe_inputs(33, only_expert=5)
    assert (inputs.topk_ids[:, 0] == 5).all()
    torch.testing.assert_close(FusedExperts(8)(*inputs.args()),
                               fused_experts_reference(*inputs.args()))


def test_no_tokens():
    inputs = moe_inputs(0)
    assert FusedExperts(8)(*inputs.args()).shape == (0, 32)


@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
def test_expert_map_splits_the_sum_over_ranks(strategy):
    """With 7 experts over 3 ranks (not divisible), each rank's partial output over its own
    experts sums to the whole layer's output."""
    inputs = moe_inputs(20, num_experts=7, top_k=3)
    placement = ExpertPlacement(7, 3, strategy)
    total = torch.zeros_like(inputs.x)
    for rank in range(3):
        mine = placement.local_experts(rank)
        expert_map = placement.expert_map(rank)
        args = (inputs.x, inputs.w13[mine], inputs.w2[mine], inputs.topk_weights,
                inputs.topk_ids, expert_map)
        partial = CpuFusedExperts(len(mine))(*args)
        torch.testing.assert_close(partial, fused_experts_reference(*args))
        total += partial
    torch.testing.assert_close(total, fused_experts_reference(*inputs.args()))


def test_placements():
    linear, round_robin = ExpertPlacement(7, 3, "linear"), ExpertPlacement(7, 3, "round_robin")
    assert [linear.local_experts(r) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [round_robin.local_experts(r) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert round_robin.expert_map(1).tolist() == [-1, 0, -1, -1, 1, -1, -1]
    with pytest.raises(ValueError, match="at least as many experts"):
        ExpertPlacement(2, 3)


def test_group_by_expert_puts_other_ranks_pairs_first():
    ids = torch.tensor([[3, 0], [1, 3]])
    expert_map = torch.tensor([0, -1, -1, 1])  # experts 0 and 3 are here
    order, counts, skipped = group_by_expert(ids, 2, expert_map)
    assert (skipped, counts) == (1, [1, 2])  # expert 1 lives elsewhere
    assert ids.flatten()[order[skipped:]].tolist() == [0, 3, 3]


@pytest.mark.parametrize("renormalize", [True, False])
def test_select_experts(renormalize):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = select_experts(logits, 2, renormalize)
    probs = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[1, 2]]
    expected = probs[[1, 2]] / (probs[[1, 2]].sum() if renormalize else 1.0)
    torch.testing.assert_close(weights[0], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 37, 1024])
def test_gpu_triton_kernel_matches_reference(num_tokens, dtype):
    """The Triton grouped GEMM on CUDA, at a real layer's width, against the CPU path."""
    inputs = moe_inputs(num_tokens, num_experts=64, top_k=8, hidden=1024, intermediate=384)
    expected = CpuFusedExperts(64)(*inputs.args())
    x, w13, w2, weights, ids = inputs.args()
    out = FusedExperts(64)(x.to("cuda", dtype), w13.to("cuda", dtype), w2.to("cuda", dtype),
                           weights.cuda(), ids.cuda())
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {
        "atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(out.float().cpu(), expected, **tolerance)
