"""The bf16 GEMV kernel against its fp32 reference, and what it takes."""

from __future__ import annotations

import pytest
import torch

from fleetlm.kernels import bf16_gemv

pytestmark = pytest.mark.skipif(not bf16_gemv.is_available(), reason="no C compiler")


def _inputs(rows: int, n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator).bfloat16()
    weight = torch.randn(n, k, generator=generator).bfloat16()
    return x, weight


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(("n", "k"), [(96, 64), (960, 576), (16, 32)])
def test_matches_the_fp32_reference(rows, n, k):
    """Sums of the same exact products in another order: at most the last bf16 bit apart."""
    x, weight = _inputs(rows, n, k, seed=rows * n)
    with torch.inference_mode():
        got = bf16_gemv.gemv(x, weight)
    want = bf16_gemv.gemv_reference(x, weight)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
    assert (got == want).float().mean() > 0.9  # most outputs round to the same bf16


def test_a_rows_result_does_not_depend_on_the_batch():
    x, weight = _inputs(8, 960, 576)  # more rows than supports() sends: any m runs
    with torch.inference_mode():
        batch = bf16_gemv.gemv(x, weight)
        for i in range(x.shape[0]):
            assert torch.equal(bf16_gemv.gemv(x[i:i + 1], weight)[0], batch[i])


def test_keeps_leading_dimensions():
    x, weight = _inputs(6, 96, 64)
    with torch.inference_mode():
        got = bf16_gemv.gemv(x.view(2, 3, 64), weight)
    assert got.shape == (2, 3, 96)
    assert torch.equal(got.view(6, 96), bf16_gemv.gemv(x, weight))


def test_supports_only_what_the_kernel_runs():
    x, weight = _inputs(bf16_gemv.MAX_ROWS, 96, 64)
    with torch.inference_mode():
        assert bf16_gemv.supports(x, weight)
        assert not bf16_gemv.supports(x.float(), weight.float())  # bf16 only
        assert not bf16_gemv.supports(x.float(), weight)  # mixed dtypes
        assert not bf16_gemv.supports(x.repeat(2, 1), weight)  # more rows than MAX_ROWS
        assert not bf16_gemv.supports(x[:, :48], weight[:, :48])  # k not a multiple of 32
        assert not bf16_gemv.supports(x, weight[:88])  # n not a multiple of 16
        assert not bf16_gemv.supports(x, weight.t().contiguous().t())  # a strided weight
        assert not bf16_gemv.supports(x[:0], weight)
    assert not bf16_gemv.supports(x, weight)  # autograd on
