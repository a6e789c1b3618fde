"""FP8 W8A8 (`fp8_linear`): per-token float8 activations; the CPU product (dequantized fp32)
and, on CUDA (gpu marker), `torch._scaled_mm` with row-wise scales at the built-in model's
widths, against the dequantized operands multiplied in float64; the layer weight filled by
row ranges like the int8 one."""

from __future__ import annotations

import pytest
import torch

from fleetlm.kernels import fp8_linear
from fleetlm.kernels.fp8_linear import FP8, FP8_MAX, Fp8Matrix, Fp8Weight


def _weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 rows with one scale each, as `fleetlm quantize --scheme FP8_DYNAMIC` writes."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    scale = w.abs().amax(dim=1) / FP8_MAX
    return (w / scale[:, None]).to(FP8), scale


def test_activations_are_rounded_to_float8_per_row():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 5
    x[3] = 0  # a row of zeros: zeros, not NaN
    q, scale = fp8_linear.quantize_rows_reference(x)
    assert q.dtype == FP8 and scale.shape == (6, 1)
    back = q.float() * scale
    assert torch.equal(back[3], torch.zeros(64))
    # each row's largest value is exact (it maps to 448); the others within e4m3's rounding
    # (3 mantissa bits: relative error at most 2^-4, or half the smallest subnormal step)
    peak = x.abs().argmax(dim=1)
    rows = torch.arange(6)
    assert torch.allclose(back[rows, peak], x[rows, peak], rtol=1e-6)
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2.0 ** -10).all()


@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (7, 576, 960), (32, 96, 48)])
def test_cpu_product_equals_the_float64_reference(m, k, n):
    weight, scale = _weight(n, k, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    out = fp8_linear.fp8_linear(x, weight, scale, bias)
    expected = fp8_linear.linear_reference(x, weight, scale, bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    # and the quantization is what the product carries: against the float operands the error
    # is e4m3's, far above fp32's
    float_product = x @ (weight.float() * scale[:, None]).T + bias
    assert 1e-3 < (out - float_product).abs().max() < 0.1 * float_product.abs().max()


def test_the_matrix_is_filled_by_row_ranges():
    q_w, q_s = _weight(32, 64, seed=1)
    k_w, k_s = _weight(16, 64, seed=2)
    matrix = Fp8Matrix((48, 64))
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="not loaded whole"):
        matrix.linear(x)
    matrix.put(0, Fp8Weight(q_w, q_s[:, None]))
    matrix.put(32, Fp8Weight(k_w, k_s))
    assert matrix.nbytes == 48 * 64 + 48 * 4
    expected = fp8_linear.fp8_linear(x, torch.cat([q_w, k_w]), torch.cat([q_s, k_s]))
    torch.testing.assert_close(matrix.linear(x.view(1, 3, 64)), expected.view(1, 3, 48))
    with pytest.raises(ValueError, match="does not fit"):
        matrix.put(40, Fp8Weight(k_w, k_s))


def test_shapes_and_dtypes_are_checked():
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Matrix((48, 60))
    weight = Fp8Weight(torch.zeros(16, 32, dtype=torch.int8), torch.ones(16))
    with pytest.raises(ValueError, match="holds torch.int8 values"):
        Fp8Matrix((16, 32)).put(0, weight)
    narrowed = Fp8Weight(*_weight(32, 64, seed=4)).narrow(0, 16, 16)
    assert isinstance(narrowed, Fp8Weight) and narrowed.shape == (16, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 37, 256])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (3072, 576)])
def test_gpu_fp8_gemm_matches_the_reference(m, n, k):
    """Hopper's FP8 GEMM (row-wise scales, bf16 out) at the built-in model's widths."""
    weight, scale = _weight(n, k, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    expected = fp8_linear.linear_reference(x, weight, scale)
    matrix = Fp8Matrix((n, k), "cuda")
    matrix.put(0, Fp8Weight(weight, scale))
    out = matrix.linear(x.to("cuda", torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    # x rounded to bf16 first, fp32 accumulation, a bf16 result: within bf16's precision
    torch.testing.assert_close(out.float().cpu(), expected, rtol=2e-2,
                               atol=2e-2 * expected.abs().max().item())
