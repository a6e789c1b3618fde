"""The GGUF kernel (csrc/gguf_matmul.c) against dequantize-then-matmul: gguf-py (llama.cpp's
own reference dequantizers) turns the same blocks into fp32, torch multiplies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fleetlm.kernels import cpu_build, gguf_linear
from fleetlm.kernels.gguf_linear import GGUFWeight, QuantizedMatrix

# Byte offsets of the fp16 scales inside one block of each type (the rest is quantized values).
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
QUANTIZED = sorted(SCALE_OFFSETS)


def random_weight(name: str, rows: int, cols: int, seed: int = 0) -> GGUFWeight:
    """Random quantized values with finite, weight-sized fp16 scales."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[name]
    if name in ("F32", "F16"):
        values = rng.normal(0, 0.05, (rows, cols)).astype(np.float32 if name == "F32"
                                                            else np.float16)
        return GGUFWeight(torch.from_numpy(values.view(np.uint8)), qtype, cols)
    block, type_size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[name]:
        scales = rng.uniform(-0.01, 0.01, (rows, cols // block)).astype(np.float16)
        data[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return GGUFWeight(torch.from_numpy(data.reshape(rows, -1)), qtype, cols)


@pytest.fixture(scope="module", autouse=True)
def compiled():
    assert gguf_linear.is_available(), "the C compiler is part of the test environment"


def other_build(build: str):
    """The kernel built for this CPU (None), for CPUs without AVX2 (plain loops) or for AVX2
    (16 vector registers)."""
    if build == "native":
        return None
    if build == "haswell" and not {"avx2", "fma"} <= set(cpu_build._cpu_features().split()):
        pytest.skip("this CPU cannot run an AVX2 build")
    flags = tuple(f for f in cpu_build.COMPILE_FLAGS if not f.startswith("-march"))
    return gguf_linear.load_library(flags + (("-march=haswell",) if build == "haswell" else ()))


def int8_reference(x: torch.Tensor, weight: GGUFWeight) -> torch.Tensor:
    """What the int8 path computes: x rounded per block to int8, times dequantize(W), in fp64."""
    xq = gguf_linear.quantize_input_reference(x).double()
    return (xq @ weight.dequantize().double().T).float()


@pytest.mark.parametrize("name", [*QUANTIZED, "F16", "F32"])
@pytest.mark.parametrize("m", [1, 2, 5, 33])
def test_matmul_equals_dequantize_then_matmul(name, m):
    weight = random_weight(name, 37, 512)  # 37 rows: whole tiles of 4 and a ragged one
    x = torch.randn(m, 512)
    reference = x @ weight.dequantize().T
    got = gguf_linear.matmul(x, weight, int8_dot=False)
    # The same products; only the order of the fp32 sums differs.
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())


@pytest.mark.parametrize("build", ["native", "portable", "haswell"])
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("m", [1, 2, 3, 15, 40])
def test_int8_dot_equals_rounded_input_times_dequantized_weight(build, name, m):
    """Below INT8_GEMM_MIN_ROWS (decode steps, short prompt chunks), Q4_0 / Q4_1 / Q8_0
    take int8 activations by default: the products are exact integers, so the result is the
    block-rounded input times dequantize(W) up to fp32 rounding, on every build (AVX2's
    vpmaddubsw, VNNI's vpdpbusd, plain loops). The rounding itself costs what llama.cpp's
    does: under 2% of the exact product's largest value."""
    library = other_build(build)
    weight = random_weight(name, 37, 512, seed=5)
    x = torch.randn(m, 512) * torch.linspace(0.01, 3, 512)  # blocks of different magnitudes
    x[0, 64:96] = 0  # a block of zeros: scale 0
    got = gguf_linear.matmul(x, weight, library, int8_dot=True)
    reference = int8_reference(x, weight)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
    exact = x @ weight.dequantize().T
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    assert not torch.equal(got, exact)  # it did take the int8 path


def test_input_blocks_round_as_the_reference_does():
    """The kernel's own rounding of an input row, read back: the same scales and int8 values
    as quantize_input_reference, ties rounded to even, a block of zeros with scale 0."""
    x = torch.randn(3, 96)
    x[1, 32:64] = 0
    x[2, :32] = torch.arange(32) - 15.5  # halves, and with a max of 127 the scale is 1:
    x[2, 0] = 127                         # x / d is a tie for every other value
    blocks = np.zeros(3 * 3, dtype=[("d", "<f4"), ("s", "<f4"), ("q", "i1", 32)])
    gguf_linear._library().fleet_gguf_quantize_input(x.data_ptr(), 3, 96, blocks.ctypes.data)
    d = torch.from_numpy(blocks["d"].copy()).view(3, 3, 1)
    q = torch.from_numpy(blocks["q"].astype(np.float32)).view(3, 3, 32)
    assert torch.equal((q * d).view(3, 96), gguf_linear.quantize_input_reference(x))
    sums = torch.from_numpy(blocks["s"].copy()).view(3, 3, 1)
    assert torch.equal(sums, d * q.sum(-1, keepdim=True))
    assert d[1, 1].item() == 0 and not q[1, 1].any()
    assert d[2, 0].item() == 1 and q[2, 0, 1:5].tolist() == [-14, -14, -12, -12]


def test_int8_dot_follows_the_environment(monkeypatch):
    monkeypatch.setenv(gguf_linear.INT8_DOT_ENV, "0")
    assert not gguf_linear.int8_dot_enabled()
    monkeypatch.delenv(gguf_linear.INT8_DOT_ENV)
    assert gguf_linear.int8_dot_enabled()


@pytest.mark.parametrize("build", ["native", "portable", "haswell"])
@pytest.mark.parametrize("int8_dot", [False, True])
def test_a_row_gets_the_same_bits_in_any_batch_below_the_gemm(build, int8_dot):
    """Below GEMM_MIN_ROWS, Q4_0 / Q4_1 / Q8_0 rows are multiplied straight from the blocks
    (fp32 or int8 activations), other types through a dequantized buffer; every path sums in
    one order, so a decoding sequence's logits do not depend on what it is batched with. The
    same source built for CPUs without AVX2 (plain loops) and for AVX2 (16 vector registers)
    computes the same products."""
    library = other_build(build)
    x = torch.randn(gguf_linear.GEMM_MIN_ROWS - 1, 512)
    for name in [*QUANTIZED, "F16"]:
        weight = random_weight(name, 37, 512, seed=2)
        batch = gguf_linear.matmul(x, weight, library, int8_dot=int8_dot)
        if int8_dot and weight.qtype in gguf_linear.INT8_DOT_TYPES:
            reference = int8_reference(x, weight)
        else:
            reference = x @ weight.dequantize().T
        torch.testing.assert_close(batch, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
        for start, stop in ((0, 1), (1, 3), (3, 4), (5, len(x))):
            assert torch.equal(gguf_linear.matmul(x[start:stop], weight, library, int8_dot),
                               batch[start:stop])


def int8_kernel(library, x: torch.Tensor, weight: GGUFWeight) -> torch.Tensor:
    """fleet_gguf_matmul_q8 called directly, at any number of rows."""
    y = torch.empty(x.shape[0], weight.shape[0])
    gguf_linear._check(library.fleet_gguf_matmul_q8(
        x.data_ptr(), x.shape[0], x.shape[1], weight.data.data_ptr(), weight.shape[0],
        int(weight.qtype), y.data_ptr(), torch.get_num_threads()))
    return y


@pytest.mark.parametrize("build", ["native", "haswell"])
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_wide_tiles_sum_as_the_four_row_tiles_do(build, name):
    """AVX2 builds multiply Q4_0 / Q4_1 (and Q8_0 from two input rows) by tiles of eight
    weight rows across a vector's lanes (no horizontal adds); the same source built without
    them keeps the four-row tiles. Both form the same integer sum per block and add them in
    the same order, so every output is bit-equal: at one row and at a prompt's hundreds,
    over long and single-block rows, in whole tiles and ragged ones. A pass takes two tiles
    (16 rows) and three input rows (Q8_0: two): 37 rows end in a pass of a tile of five and
    one of repeats, 45 rows in a tile of eight and one of five; 8, 33 and 70 input rows end
    in passes of two, three and one (Q8_0: two, one and two)."""
    library = other_build(build) or gguf_linear._library()
    if not library.has_wide_tiles:
        pytest.skip("no AVX2 on this CPU: no wide tiles")
    flags = tuple(f for f in cpu_build.COMPILE_FLAGS if not f.startswith("-march"))
    march = "-march=haswell" if build == "haswell" else "-march=native"
    four_row = gguf_linear.load_library(flags + (march, "-DFLEET_NO_WIDE_TILES"))
    assert not four_row.has_wide_tiles
    for rows, cols in ((37, 512), (45, 512), (37, 32)):
        weight = random_weight(name, rows, cols, seed=7)
        for m in (1, 2, 3, 8, 33, 70):
            x = torch.randn(m, cols) * torch.linspace(0.01, 3, cols)
            x[0, :32] = 0  # a block of zeros: scale 0
            assert torch.equal(int8_kernel(library, x, weight), int8_kernel(four_row, x, weight))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_a_prompt_takes_the_integer_kernel_with_the_bits_of_a_decode_step(name):
    """Where the build has wide tiles (AVX2), a Q4_0 / Q4_1 / Q8_0 product of any size takes
    int8 activations (no GEMM): a prompt of INT8_GEMM_MIN_ROWS rows and more gets, row by row,
    the bits that row gets alone, as a decode step would compute it."""
    if not gguf_linear._library().has_wide_tiles:
        pytest.skip("no AVX2 on this CPU: no wide tiles")
    weight = random_weight(name, 37, 512, seed=3)
    x = torch.randn(gguf_linear.INT8_GEMM_MIN_ROWS + 7, 512)
    with torch.inference_mode():
        batch = gguf_linear.matmul(x, weight, int8_dot=True)
        for row in (0, 40, len(x) - 1):
            assert torch.equal(gguf_linear.matmul(x[row:row + 1], weight, int8_dot=True),
                               batch[row:row + 1])
    reference = int8_reference(x, weight)
    torch.testing.assert_close(batch, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())


@pytest.mark.parametrize("name", ["Q8_0", "Q6_K"])
def test_many_rows_go_through_the_dequantized_weight_a_slice_at_a_time(name, monkeypatch):
    """A prefill-sized product with fp32 activations (Q8_0 takes int8 ones by default, and
    then the GEMM only from INT8_GEMM_MIN_ROWS rows and only without AVX2) dequantizes the
    weight slice by slice (here 3 slices of 16 rows and a ragged one of 5) and multiplies each
    with a GEMM: the same products."""
    monkeypatch.setattr(gguf_linear, "GEMM_SLICE_ELEMENTS", 16 * 512)
    weight = random_weight(name, 53, 512, seed=4)
    x = torch.randn(max(gguf_linear.GEMM_MIN_ROWS, gguf_linear.INT8_GEMM_MIN_ROWS) + 7, 512)
    reference = x @ weight.dequantize().T
    with torch.inference_mode():  # as in the engine: oneDNN's GEMM where torch has it
        got = gguf_linear.matmul(x, weight, int8_dot=False)
        monkeypatch.setattr(gguf_linear, "GEMM_SLICE_ELEMENTS", 1 << 20)
        whole = gguf_linear.matmul(x, weight, int8_dot=False)  # wider than the weight: one GEMM
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
    torch.testing.assert_close(whole, got, rtol=1e-5,
                               atol=1e-5 * reference.abs().max())


@pytest.mark.parametrize("name", [*QUANTIZED, "F16"])
def test_rows_dequantize_exactly(name):
    weight = random_weight(name, 64, 256, seed=1)
    ids = torch.tensor([[3, 0], [63, 3]])
    rows = weight.dequantize_rows(ids)
    assert rows.shape == (2, 2, 256)
    assert torch.equal(rows, weight.dequantize()[ids])
    for outside in (64, -1):
        with pytest.raises(IndexError, match="outside 0..63"):
            weight.dequantize_rows(torch.tensor([0, outside]))


def test_shards_stack_into_one_matrix_per_type(monkeypatch):
    """q, k and v arrive one by one; neighbours of one type merge, another type stays apart."""
    monkeypatch.setattr(gguf_linear, "_INT8_DOT", False)  # the exact products
    q, k, v = (random_weight("Q4_1", 8, 64, 1), random_weight("Q4_1", 4, 64, 2),
               random_weight("Q8_0", 4, 64, 3))
    matrix = QuantizedMatrix((16, 64))
    for row, shard in ((12, v), (0, q), (8, k)):
        matrix.put(row, shard)
    assert matrix.qtypes == ["Q4_1", "Q8_0"]
    x = torch.randn(3, 64)
    dense = torch.cat([w.dequantize() for w in (q, k, v)])
    torch.testing.assert_close(matrix.linear(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([0, 9, 15])
    assert torch.equal(matrix.embedding(ids, torch.float32), dense[ids])


def test_column_shards_split_on_block_boundaries_only():
    weight = random_weight("Q4_K", 2, 512)
    assert torch.equal(weight.narrow(1, 256, 256).dequantize(), weight.dequantize()[:, 256:])
    with pytest.raises(ValueError, match="256-element blocks"):
        weight.narrow(1, 0, 128)


def test_unsupported_type_is_named():
    with pytest.raises(ValueError, match="Q5_K is not supported"):
        GGUFWeight(torch.zeros(1, 176, dtype=torch.uint8), GGMLQuantizationType.Q5_K, 256)


def packed_reference(weight: GGUFWeight) -> torch.Tensor:
    """`weight` in eight-row tiles, as csrc/gguf_matmul.c's fleet_gguf_repack describes them:
    per tile and block, 32-byte vectors (dword r of vector g: bytes 4g..4g+3 of row r's
    values: four vectors of Q4's nibbles, eight of Q8_0's bytes), the rows' d's, then Q4_1's
    m's."""
    rows, cols = weight.shape
    _, type_size = GGML_QUANT_SIZES[weight.qtype]
    value_bytes = 32 if weight.qtype == GGMLQuantizationType.Q8_0 else 16
    head = type_size - value_bytes  # d (and m) before a block's values
    groups = value_bytes // 4
    blocks = weight.data.numpy().reshape(rows // 8, 8, cols // 32, type_size)
    values = blocks[..., head:].reshape(rows // 8, 8, cols // 32, groups, 4)  # [.., r, b, g, e]
    parts = [values.transpose(0, 2, 3, 1, 4).reshape(rows // 8, cols // 32, 32 * groups)]
    parts += [blocks[..., at:at + 2].transpose(0, 2, 1, 3).reshape(rows // 8, cols // 32, 16)
              for at in range(0, head, 2)]
    return torch.from_numpy(np.concatenate(parts, axis=-1).reshape(rows, -1))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_packed_tiles_hold_the_same_bytes_in_the_kernels_layout(name):
    weight = random_weight(name, 24, 512, seed=5)
    packed = weight.repacked()
    assert packed.packed and not weight.packed and packed.shape == weight.shape
    assert torch.equal(packed.data, packed_reference(weight))
    assert torch.equal(packed.unpacked().data, weight.data)
    with pytest.raises(ValueError, match="cannot be packed"):
        GGUFWeight(random_weight(name, 12, 512).data, weight.qtype, 512, packed=True)


@pytest.mark.parametrize("build", ["native", "haswell"])
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_packed_products_equal_the_rows_products(build, name):
    """The wide tiles read a packed matrix in place up to one pass of input rows and decode it
    into their buffer beyond: either way every output is bit-equal to the product of the
    matrix in GGUF's rows (Q8_0's at one row: the four-row tiles). 24 rows end in a task of
    one tile; up to 3 input rows (Q8_0: 2) are read in place, 4, 8 and 33 through the
    buffer."""
    library = other_build(build) or gguf_linear._library()
    if not library.has_wide_tiles:
        pytest.skip("no AVX2 on this CPU: no wide tiles")
    for rows, cols in ((24, 512), (48, 512), (8, 32)):
        weight = random_weight(name, rows, cols, seed=9)
        packed = weight.repacked()
        for m in (1, 2, 3, 4, 8, 33):
            x = torch.randn(m, cols) * torch.linspace(0.01, 3, cols)
            y = torch.empty(m, rows)
            gguf_linear._check(library.fleet_gguf_matmul_q8(
                x.data_ptr(), m, cols, packed.data.data_ptr(), rows, packed.kernel_type,
                y.data_ptr(), 2))
            assert torch.equal(y, int8_kernel(library, x, weight))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_any_number_of_threads_computes_every_tile_once(name):
    """A product's tiles are shared out among the threads asked for: at any thread count,
    fewer or more than the tiles (5 rows: one tile, which a region of one thread computes),
    every output comes out once and bit-equal to one thread's: 4-row tiles at one input row
    (Q8_0), 16-row wide tiles otherwise, packed or in GGUF's rows."""
    library = gguf_linear._library()
    for rows in (5, 200, 1000):
        weight = random_weight(name, rows, 256, seed=11)
        forms = [weight]
        if library.has_wide_tiles and weight.qtype in gguf_linear.PACKED_TYPES and rows % 8 == 0:
            forms.append(weight.repacked())
        for m in (1, 3, 9):
            x = torch.randn(m, 256)
            results = []
            for form in forms:
                for threads in (1, 2, 3, 7, 64):
                    y = torch.full((m, rows), float("nan"))
                    gguf_linear._check(library.fleet_gguf_matmul_q8(
                        x.data_ptr(), m, 256, form.data.data_ptr(), rows, form.kernel_type,
                        y.data_ptr(), threads))
                    results.append(y)
            assert not results[0].isnan().any()
            assert all(torch.equal(y, results[0]) for y in results)


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0"])
def test_a_whole_matrix_is_packed_and_read_as_rows_elsewhere(monkeypatch, name):
    """Loaded whole, a Q4_1 or Q8_0 matrix is packed (where the wide tiles run); embedding
    lookups, shards that cut tiles, columns, exact fp32 products and dequantizing all read it
    as the rows it was. FLEETLM_GGUF_REPACK=0 keeps the rows."""
    if not gguf_linear._library().has_wide_tiles:
        pytest.skip("no AVX2 on this CPU: no wide tiles")
    top, bottom = random_weight(name, 16, 64, 1), random_weight(name, 8, 64, 2)
    matrix = QuantizedMatrix((24, 64))
    matrix.put(16, bottom)
    assert not matrix.parts[0][1].packed  # not whole yet
    matrix.put(0, top)
    whole = matrix.whole
    assert whole.packed and matrix.nbytes == top.nbytes + bottom.nbytes
    dense = torch.cat([top.dequantize(), bottom.dequantize()])
    assert torch.equal(whole.dequantize(), dense)
    ids = torch.tensor([[0, 23], [9, 16]])
    assert torch.equal(matrix.embedding(ids, torch.float32), dense[ids])
    many = torch.randint(0, 24, (70,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(matrix.embedding(many, torch.float32), dense[many])  # on every thread
    with monkeypatch.context() as patch:  # a build whose row lookups predate tiles
        patch.setattr(gguf_linear._library(), "has_packed_rows", False)
        assert torch.equal(matrix.embedding(ids, torch.float32), dense[ids])
    assert whole.narrow(0, 8, 16).packed
    assert torch.equal(whole.narrow(0, 8, 16).dequantize(), dense[8:])
    assert not whole.narrow(0, 4, 8).packed
    assert torch.equal(whole.narrow(0, 4, 8).dequantize(), dense[4:12])
    assert torch.equal(whole.narrow(1, 32, 32).dequantize(), dense[:, 32:])
    x = torch.randn(3, 64)
    torch.testing.assert_close(gguf_linear.matmul(x, whole, int8_dot=False), x @ dense.T,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(matrix.linear(x), gguf_linear.matmul(x, whole.unpacked()))
    monkeypatch.setenv(gguf_linear.REPACK_ENV, "0")
    kept = QuantizedMatrix((16, 64))
    kept.put(0, top)
    assert not kept.whole.packed
