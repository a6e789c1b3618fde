"""Triton kernels run by the Triton interpreter on CPU tensors, against the torch reference.

Not collected by the main test run (the name has no `test_` prefix): `TRITON_INTERPRET=1` must
be set before Triton is first imported and then holds for the whole process, which would
turn the GPU tests' kernels into interpreted ones. `test_triton_attention.py` runs this file
in a subprocess of its own. fp32/fp16 only: the interpreter gets `tl.dot` on bf16 wrong.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton or the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from fleetlm.kernels import attention  # noqa: E402

triton_attention = pytest.importorskip("fleetlm.kernels.triton_attention")

HEAD_DIM = 32  # the interpreter runs every program in numpy: tiny shapes keep it quick
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
BLOCKS = pytest.mark.parametrize("block_size", [8, 16])
GROUPS = pytest.mark.parametrize("group", [1, 3])
PREFILL_Q_LENS = [5, 1, 7, 20]  # a fresh prompt, a decode row, chunks after earlier context
PREFILL_SEQ_LENS = [5, 9, 20, 45]


def test_kernels_are_interpreted():
    assert type(triton_attention._paged_decode_kernel).__name__ == "InterpretedFunction"


@DTYPES
@BLOCKS
@GROUPS
def test_decode_matches_reference(group, block_size, dtype, paged_batch, close):
    seq_lens = [1, 8, 17, 40]
    batch = paged_batch([1] * len(seq_lens), seq_lens, group=group, block_size=block_size,
                        dtype=dtype, head_dim=HEAD_DIM)
    out = triton_attention.paged_decode_attention(*batch.decode_args())
    assert out.dtype == dtype
    close(out, attention.paged_decode_attention_reference(*batch.decode_args()), dtype)


@DTYPES
@BLOCKS
@GROUPS
def test_prefill_matches_reference(group, block_size, dtype, paged_batch, close):
    batch = paged_batch(PREFILL_Q_LENS, PREFILL_SEQ_LENS, group=group, block_size=block_size,
                        dtype=dtype, head_dim=HEAD_DIM)
    out = triton_attention.paged_prefill_attention(*batch.prefill_args())
    close(out, attention.paged_prefill_attention_reference(*batch.prefill_args()), dtype)


def test_prefill_query_tiles_split_a_long_chunk(paged_batch, close):
    """More query tokens than one program's tile (and a max_seqlen_q hint)."""
    q_lens, seq_lens = [40, 3], [50, 3]
    batch = paged_batch(q_lens, seq_lens, group=1, block_size=16, dtype=torch.float32,
                        head_dim=HEAD_DIM, num_kv_heads=1)
    out = triton_attention.paged_prefill_attention(*batch.prefill_args(), max_seqlen_q=40)
    expected = attention.paged_prefill_attention_reference(*batch.prefill_args())
    close(out, expected, torch.float32)


@DTYPES
def test_write_kv_cache_matches_reference(dtype):
    k_cache = torch.zeros(4, 8, 2, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(5, 2, HEAD_DIM)
    value = torch.randn(5, 2, HEAD_DIM)
    slots = torch.tensor([0, 9, -1, 31, 12])
    triton_attention.write_kv_cache(key, value, k_cache, v_cache, slots)
    k_expected, v_expected = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    attention.write_kv_cache_reference(key, value, k_expected, v_expected, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_write_kv_cache_takes_strided_token_rows():
    """key/value as slices of a fused qkv projection: rows contiguous, tokens strided."""
    qkv = torch.randn(3, 3, 2, HEAD_DIM)
    key, value = qkv[:, 1], qkv[:, 2]
    k_cache = torch.zeros(1, 4, 2, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    triton_attention.write_kv_cache(key, value, k_cache, v_cache, torch.tensor([2, 0, 1]))
    assert torch.equal(k_cache[0, :3], key[[1, 2, 0]])
    assert torch.equal(v_cache[0, :3], value[[1, 2, 0]])


@pytest.mark.parametrize("num_tokens", [1, 7, 40])
@DTYPES
def test_fused_moe_matches_reference(num_tokens, dtype):
    from moe_cases import moe_inputs

    from fleetlm.kernels import moe, triton_moe

    inputs = moe_inputs(num_tokens, num_experts=5, top_k=2, dtype=dtype)
    expected = moe.fused_experts_reference(*moe_inputs(num_tokens, num_experts=5).args())
    out = triton_moe.fused_experts(*inputs.args())
    tolerance = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {
        "atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(out.float(), expected, **tolerance)


def test_fused_moe_skips_other_ranks_experts():
    from moe_cases import moe_inputs

    from fleetlm.kernels import moe, triton_moe
    from fleetlm.parallel.experts import ExpertPlacement

    inputs = moe_inputs(9, num_experts=5, top_k=2, only_expert=4)
    placement = ExpertPlacement(5, 2, "round_robin")
    mine, expert_map = placement.local_experts(1), placement.expert_map(1)
    args = (inputs.x, inputs.w13[mine], inputs.w2[mine], inputs.topk_weights, inputs.topk_ids,
            expert_map)
    torch.testing.assert_close(triton_moe.fused_experts(*args), moe.fused_experts_reference(*args))
