"""oneDNN prepacked linear against `F.linear`, and its packed copy following the weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fleetlm.kernels import bf16_gemm, bf16_gemv, cpu_linear
from fleetlm.kernels.cpu_linear import PackedLinear
from fleetlm.parallel.layers import ColumnParallelLinear

pytestmark = pytest.mark.skipif(not cpu_linear.is_available(), reason="torch without oneDNN")


@pytest.mark.parametrize("rows", [1, 5, 8, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator)
    b = torch.randn(96, generator=generator) if bias else None
    x = torch.randn(rows, 64, generator=generator)
    with torch.inference_mode():
        got = PackedLinear()(x, weight, b)
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_repacks_when_the_loader_writes_the_weight():
    layer = ColumnParallelLinear(32, 48)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        for seed in (0, 1):  # load, use, load other weights, use again
            new = torch.randn(48, 32, generator=torch.Generator().manual_seed(seed))
            layer.weight.weight_loader(layer.weight, new)
            torch.testing.assert_close(layer(x), F.linear(x, new), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.bfloat16 not in cpu_linear.packed_dtypes(),
                    reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
@pytest.mark.parametrize("rows", [2, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_is_packed_and_gets_f_linears_bits(rows, bias):
    """What fleetlm's kernels leave to oneDNN: products with a bias, and where bf16_gemm does
    not run (AMX; the next tests), bias-free ones of two rows or more."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    b = torch.randn(96, generator=generator).bfloat16() if bias else None
    if not bias and bf16_gemm.is_available():
        pytest.skip("bias-free bf16 products take bf16_gemm here")
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    linear = PackedLinear()
    with torch.inference_mode():
        assert cpu_linear.supports(x, weight)
        got = linear(x, weight, b)
    assert linear._packed is not None
    assert torch.equal(got, F.linear(x, weight, b))


@pytest.mark.skipif(not bf16_gemv.is_available() or bf16_gemm.is_available(),
                    reason="no C compiler, or bf16_gemm takes the row here")
def test_a_bf16_row_takes_the_gemv_kernel():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    x = torch.randn(bf16_gemv.MAX_ROWS, 64, generator=generator).bfloat16()
    linear = PackedLinear()
    with torch.inference_mode():
        got = linear(x, weight)
        assert torch.equal(got, bf16_gemv.gemv(x, weight))
        assert linear._packed is None  # no packed copy made for it
        linear(x, weight, torch.zeros(96).bfloat16())  # a bias: oneDNN's GEMM takes it
    assert linear._packed is not None or not cpu_linear.supports(x, weight)


@pytest.mark.skipif(not bf16_gemm.is_available(),
                    reason="needs a C compiler and AVX512-BF16 without AMX")
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_bias_free_bf16_products_take_fleetlms_gemm(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    linear = PackedLinear()
    with torch.inference_mode():
        got = linear(x, weight)
        assert torch.equal(got, bf16_gemm.gemm(x, bf16_gemm.pack(weight)))
        assert linear._packed is None and linear._gemm_packed is not None
        packed = linear._gemm_packed
        linear(x, weight)
        assert linear._gemm_packed is packed  # packed once
    with torch.no_grad():  # a loader writes the weight: its version counter moves
        weight.copy_(torch.randn(96, 64, generator=generator).bfloat16())
    with torch.inference_mode():
        got = linear(x, weight)
        assert linear._gemm_packed is not packed  # packed again
        assert torch.equal(got, bf16_gemm.gemm(x, bf16_gemm.pack(weight)))


def test_falls_back_where_onednn_is_not_used():
    linear = PackedLinear()
    weight = torch.randn(16, 8)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        assert not cpu_linear.supports(x.half(), weight.half())
        torch.testing.assert_close(linear(x.half(), weight.half()), F.linear(x.half(), weight.half()))
        assert not cpu_linear.supports(x.bfloat16(), weight)  # mixed dtypes
        assert not cpu_linear.supports(x[:0], weight)
        assert linear(x[:0], weight).shape == (0, 16)
    assert not cpu_linear.supports(x, weight)  # autograd on: torch's op keeps the graph
    w = weight.clone().requires_grad_()
    linear(x, w).sum().backward()
    assert w.grad is not None


def test_weights_made_in_inference_mode_work():
    with torch.inference_mode():
        weight = torch.randn(24, 16)  # an inference tensor: no version counter
        x = torch.randn(4, 16)
        torch.testing.assert_close(PackedLinear()(x, weight), F.linear(x, weight),
                                   rtol=1e-5, atol=1e-5)
