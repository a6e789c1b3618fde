"""The small-batch bf16 GEMM kernel against its fp32 reference, and what it takes."""

from __future__ import annotations

import pytest
import torch

from fleetlm.kernels import bf16_gemm

pytestmark = pytest.mark.skipif(not bf16_gemm.is_available(),
                                reason="needs a C compiler and AVX512-BF16 without AMX")


def _inputs(rows: int, n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator).bfloat16()
    weight = torch.randn(n, k, generator=generator).bfloat16()
    return x, weight


def test_pack_puts_a_k_pair_of_a_groups_outputs_side_by_side():
    n, k = 16 * (bf16_gemm.GROUP + 1), 6  # one whole group and a last one of one block
    weight = torch.arange(n * k, dtype=torch.float32).view(n, k).bfloat16()
    packed = bf16_gemm.pack(weight)
    assert packed.shape == (n * k,)
    group_size = bf16_gemm.GROUP * 16 * k
    for block, p, i, j in [(0, 0, 0, 0), (0, 0, 0, 1), (5, 2, 15, 1), (1, 1, 3, 0)]:
        at = (p * bf16_gemm.GROUP + block) * 32 + 2 * i + j
        assert packed[at] == weight[16 * block + i, 2 * p + j]
    for p, i, j in [(0, 0, 0), (2, 15, 1), (1, 7, 0)]:  # the last group: its one block
        assert packed[group_size + p * 32 + 2 * i + j] == weight[96 + i, 2 * p + j]


# Rows: every chunk height 1-8 (9, 13, 32 and 259: full chunks of 8, then the rest);
# outputs: whole groups of 6 blocks, a last group of 1-5 blocks (96 + 16, 960 + 48), one block.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 32, 259])
@pytest.mark.parametrize(("n", "k"), [(96, 64), (1008, 576), (112, 2), (16, 1536)])
def test_matches_the_fp32_reference(rows, n, k):
    """Sums of the same exact products in another order: at most the last bf16 bit apart."""
    x, weight = _inputs(rows, n, k, seed=rows * n + k)
    with torch.inference_mode():
        got = bf16_gemm.gemm(x, bf16_gemm.pack(weight))
    want = bf16_gemm.gemm_reference(x, weight)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
    assert (got == want).float().mean() > 0.9  # most outputs round to the same bf16


def test_a_rows_result_does_not_depend_on_the_batch():
    x, weight = _inputs(13, 960, 576)
    packed = bf16_gemm.pack(weight)
    with torch.inference_mode():
        batch = bf16_gemm.gemm(x, packed)
        for i in range(x.shape[0]):
            assert torch.equal(bf16_gemm.gemm(x[i:i + 1], packed)[0], batch[i])
        assert torch.equal(bf16_gemm.gemm(x[3:7], packed), batch[3:7])


def test_keeps_leading_dimensions():
    x, weight = _inputs(6, 96, 64)
    packed = bf16_gemm.pack(weight)
    with torch.inference_mode():
        got = bf16_gemm.gemm(x.view(2, 3, 64), packed)
    assert got.shape == (2, 3, 96)
    assert torch.equal(got.view(6, 96), bf16_gemm.gemm(x, packed))


def test_supports_only_what_the_kernel_runs():
    x, weight = _inputs(300, 96, 64)
    with torch.inference_mode():
        assert bf16_gemm.supports(x, weight) and bf16_gemm.supports(x[:1], weight)
        assert bf16_gemm.supports(x, weight.t().contiguous().t())  # packing copies anyway
        assert not bf16_gemm.supports(x[:0], weight)
        assert not bf16_gemm.supports(x.float(), weight.float())  # bf16 only
        assert not bf16_gemm.supports(x.float(), weight)  # mixed dtypes
        assert not bf16_gemm.supports(x[:, :63], weight[:, :63])  # k odd
        assert not bf16_gemm.supports(x, weight[:88])  # n not a multiple of 16
    assert not bf16_gemm.supports(x, weight)  # autograd on
