"""The fused decoder-layer kernels (csrc/fused_ops.c) against their torch references: residual
add + RMSNorm, SiLU(gate) * up, rotary in place, the K/V write; fp32 and bf16, odd sizes
(vector tails), one row and many (the threaded split)."""

import pytest
import torch

from fleetlm.kernels import fused_ops
from fleetlm.kernels.attention import write_kv_cache_reference

pytestmark = pytest.mark.skipif(not fused_ops.is_available(), reason="no C compiler")

ROWS = [1, 3, 8, 200]  # 200 x 576 is past the single-thread threshold
DIMS = [576, 13, 64, 1000]
TOLERANCES = {torch.float32: (1e-6, 2e-6), torch.bfloat16: (1e-2, 1e-2)}  # (atol, rtol)


def _close(actual, expected):
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _randn(*shape, dtype, seed):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_equals_the_reference(dtype, rows, dim, with_residual):
    x, weight = _randn(rows, dim, dtype=dtype, seed=dim), _randn(dim, dtype=dtype, seed=1)
    residual = _randn(rows, dim, dtype=dtype, seed=rows) if with_residual else None
    x_ref = x.clone()
    out, summed = fused_ops.add_rms_norm(x, residual, weight, 1e-5)
    out_ref, summed_ref = fused_ops.add_rms_norm_reference(x_ref, residual, weight, 1e-5)
    assert summed is x  # the sum is written into x, as the reference writes it
    assert torch.equal(summed, summed_ref)  # one rounded add: exactly the same
    _close(out, out_ref)


def test_add_rms_norm_keeps_leading_dimensions():
    x, residual = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    weight = torch.rand(40)
    out, _ = fused_ops.add_rms_norm(x.clone(), residual, weight, 1e-6)
    expected, _ = fused_ops.add_rms_norm_reference(x.clone(), residual, weight, 1e-6)
    assert out.shape == (2, 3, 40)
    _close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", [1536, 13, 8, 1000])
def test_silu_mul_equals_the_reference(dtype, rows, n):
    gate_up = _randn(rows, 2 * n, dtype=dtype, seed=n) * 4  # both signs, large |gate| too
    gate_up[0, :3] = torch.tensor([0.0, -100.0, 100.0], dtype=dtype)
    _close(fused_ops.silu_mul(gate_up), fused_ops.silu_mul_reference(gate_up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 300])
@pytest.mark.parametrize("head_dim", [64, 10, 128])
def test_rotary_in_place_on_qk_of_a_fused_projection(dtype, tokens, head_dim):
    """q and k heads are the first heads of each qkv row; v must stay untouched."""
    num_qk, num_v = 12, 3
    qkv = _randn(tokens, num_qk + num_v, head_dim, dtype=dtype, seed=tokens)
    angles = torch.rand(tokens, 1, head_dim // 2, generator=torch.Generator().manual_seed(2))
    cos, sin = (angles * 50).cos(), (angles * 50).sin()
    before = qkv.clone()
    expected = fused_ops.rotary_reference(before[:, :num_qk], cos, sin)
    out = fused_ops.rotary_(qkv[:, :num_qk], cos, sin)
    assert out.data_ptr() == qkv.data_ptr()
    _close(qkv[:, :num_qk], expected)
    assert torch.equal(qkv[:, num_qk:], before[:, num_qk:])


def test_rotary_falls_back_for_heads_that_are_not_contiguous():
    x = torch.randn(4, 64, 3).transpose(1, 2)  # [tokens, heads, dim] with dim stride 3
    angles = torch.rand(4, 1, 32)
    expected = fused_ops.rotary_reference(x.clone(), angles.cos(), angles.sin())
    _close(fused_ops.rotary_(x, angles.cos(), angles.sin()), expected)


def test_autograd_takes_the_reference():
    x = torch.randn(2, 16, requires_grad=True)
    weight = torch.ones(16)
    out, _ = fused_ops.add_rms_norm(x * 1.0, None, weight, 1e-6)
    out.sum().backward()
    assert x.grad is not None
    gate_up = torch.randn(2, 8, requires_grad=True)
    fused_ops.silu_mul(gate_up).sum().backward()
    assert gate_up.grad is not None


def test_other_dtypes_take_the_reference():
    gate_up = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(fused_ops.silu_mul(gate_up), fused_ops.silu_mul_reference(gate_up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_write_kv_equals_the_reference_from_a_fused_projection(dtype, num_tokens):
    """K and V are slices of qkv rows (strided tokens); a padding slot (-1) is skipped."""
    num_blocks, block_size, num_kv_heads, head_dim = 40, 16, 3, 64
    qkv = _randn(num_tokens, 9 + 2 * num_kv_heads, head_dim, dtype=dtype, seed=num_tokens)
    key, value = qkv[:, 9:9 + num_kv_heads], qkv[:, 9 + num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size,
                           generator=torch.Generator().manual_seed(3))[:num_tokens]
    slots[num_tokens // 2] = -1
    caches = [_randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=s)
              for s in range(2)]
    expected = [c.clone() for c in caches]
    assert fused_ops.supports_write_kv(key, caches[0])
    fused_ops.write_kv(key, value, *caches, slots)
    write_kv_cache_reference(key, value, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_write_kv_refuses_a_slot_past_the_cache_before_writing():
    cache = torch.zeros(2, 4, 1, 8)
    key = torch.ones(2, 1, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        fused_ops.write_kv(key, key, cache, cache.clone(), torch.tensor([0, 8]))
    assert not cache.any()


def test_write_kv_leaves_other_dtypes_and_int8_caches_to_others():
    key = torch.randn(1, 1, 16)
    assert not fused_ops.supports_write_kv(key, torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16))
    assert not fused_ops.supports_write_kv(key, torch.zeros(1, 1, 1, 20, dtype=torch.int8))


@pytest.mark.parametrize("rows, n", [(1, 49152), (5, 1000), (3, 7), (2, 17)])
def test_argmax_equals_torchs_on_ties_nans_and_infinities(rows, n):
    """Vectorized, eight lanes at a time with a scalar tail: the first index of each row's
    largest value, a NaN counting as the largest, as torch.argmax."""
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=generator)
    cases = [x, x.round(), torch.full((rows, n), float("-inf")), torch.zeros(rows, n)]
    with_nan = x.clone()
    with_nan[0, n // 3] = with_nan[-1, n - 1] = float("nan")
    tied = torch.zeros(rows, n)
    tied[:, n // 2:] = 1.0  # the first of the ties is past the first vector
    wide = torch.randn(2 * rows, n, generator=generator)[::2]  # rows a stride apart
    for logits in (*cases, with_nan, tied, wide):
        assert torch.equal(fused_ops.argmax(logits), logits.argmax(dim=-1))
