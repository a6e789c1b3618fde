"""The W8A8 kernel (csrc/int8_matmul.c) against its exact torch references: the same int8
activations and scales, int32 sums equal to the integer matmul, the same fp32 rescale."""

import ctypes

import pytest
import torch

from fleetlm.kernels import cpu_build, int8_linear
from fleetlm.kernels.int8_linear import Int8Matrix, Int8Weight

pytestmark = pytest.mark.skipif(not int8_linear.is_available(), reason="no C compiler")

# (m input rows, k, n output rows): GEMV and GEMM, k with and without a 32-byte tail, n not a
# multiple of the 4-row tile, m odd (the 2-row input pass and its remainder).
SHAPES = [(1, 64, 8), (1, 576, 1536), (1, 100, 7), (2, 33, 5), (3, 96, 13), (8, 576, 192),
          (32, 1536, 44), (5, 1, 3)]


def _int8(*shape, generator):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)


def test_kernel_path_is_named():
    assert int8_linear.kernel_path() in ("avx512vnni", "avxvnni", "avx2", "generic")


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_activation_quantization_equals_the_reference(m, k, n):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    x[0, 0] = 0.5 * (x[0].abs().max() / 127)  # a value exactly halfway: rounds to even
    q, scale = int8_linear.quantize_rows(x)
    q_ref, scale_ref = int8_linear.quantize_rows_reference(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)
    assert int(q.abs().max()) == 127


def test_a_row_of_zeros_quantizes_to_zeros():
    x = torch.zeros(2, 40)
    x[1] = torch.linspace(-1, 1, 40)
    q, scale = int8_linear.quantize_rows(x)
    assert scale[0] == 0 and not q[0].any()
    assert torch.equal(q, int8_linear.quantize_rows_reference(x)[0])


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int32_sums_are_exact(m, k, n):
    """Unit scales: every output is an int32 sum, exact in fp32 below 2^24 (k * 128 * 127 is)."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    q = _int8(m, k, generator=g).clamp(-127, 127)  # activations never hold -128
    w = _int8(n, k, generator=g)
    w[0, : min(k, 32)] = -128  # the weights' extreme value through the sign trick
    y = int8_linear.gemm(q, torch.ones(m), w, torch.ones(n))
    assert torch.equal(y, (q.int() @ w.int().T).float())


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_linear_equals_the_reference(m, k, n, with_bias):
    g = torch.Generator().manual_seed(7 + m + k + n)
    x = torch.randn(m, k, generator=g)
    w = _int8(n, k, generator=g)
    w_scale = torch.rand(n, generator=g) / 100 + 1e-4
    bias = torch.randn(n, generator=g) if with_bias else None
    y = int8_linear.w8a8_linear(x, w, w_scale, bias)
    q, x_scale = int8_linear.quantize_rows_reference(x)
    expected = int8_linear.gemm_reference(q, x_scale, w, w_scale, bias)
    # Same int32 sums and the same three fp32 operations; a compiler may fuse the last
    # multiply and add (one rounding instead of two), hence not bitwise.
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    exact = torch.nn.functional.linear(x, w.float() * w_scale[:, None], bias)
    assert (y - exact).abs().max() < 0.05 * exact.abs().max()  # and near the float product


def test_threads_do_not_change_the_result():
    g = torch.Generator().manual_seed(3)
    x, w, s = torch.randn(4, 256, generator=g), _int8(96, 256, generator=g), torch.rand(96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_linear.w8a8_linear(x, w, s)
        torch.set_num_threads(2)
        two = int8_linear.w8a8_linear(x, w, s)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_int8_matrix_stacks_shards_and_narrows_with_its_scales():
    """q, k, v loaded as row shards into one matrix; a row shard keeps its rows' scales and a
    column shard every row's."""
    g = torch.Generator().manual_seed(5)
    parts = [Int8Weight(_int8(r, 64, generator=g), torch.rand(r, 1, generator=g))
             for r in (8, 4, 4)]
    matrix = Int8Matrix((16, 64))
    row = 0
    for part in parts:
        matrix.put(row, part)
        row += part.shape[0]
    whole = torch.cat([p.dequantize() for p in parts])
    assert torch.equal(matrix.data.float() * matrix.scale[:, None], whole)
    x = torch.randn(3, 64, generator=g, dtype=torch.bfloat16)
    y = matrix.linear(x, bias=torch.ones(16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)

    shard = parts[0].narrow(0, 2, 3).narrow(1, 32, 32)
    assert torch.equal(shard.dequantize(), parts[0].dequantize()[2:5, 32:])


def test_an_incomplete_matrix_refuses_to_run():
    matrix = Int8Matrix((8, 32))
    matrix.put(0, Int8Weight(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4)))
    with pytest.raises(RuntimeError, match="not loaded whole"):
        matrix.linear(torch.randn(1, 32))
    with pytest.raises(ValueError, match="one scale per row"):
        Int8Weight(torch.zeros(4, 32, dtype=torch.int8), torch.ones(3))


def test_the_portable_build_equals_the_reference():
    """The plain-loop path, for CPUs without AVX2: the same source built without -march."""
    flags = tuple(f for f in cpu_build.COMPILE_FLAGS if not f.startswith("-march"))
    library = cpu_build.load(int8_linear.SOURCE, flags)
    library.fleet_int8_path.restype = ctypes.c_char_p
    assert library.fleet_int8_path() == b"generic"
    g = torch.Generator().manual_seed(11)
    m, k, n = 3, 70, 9
    x, w, w_scale = torch.randn(m, k, generator=g), _int8(n, k, generator=g), torch.rand(n)
    y = torch.empty(m, n)
    library.fleet_w8a8_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    assert library.fleet_w8a8_linear(x.data_ptr(), m, k, w.data_ptr(), w_scale.data_ptr(),
                                     None, n, y.data_ptr(), 2) == 0
    q, x_scale = int8_linear.quantize_rows_reference(x)
    expected = int8_linear.gemm_reference(q, x_scale, w, w_scale)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
