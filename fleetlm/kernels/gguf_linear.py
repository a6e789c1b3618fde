"""Linear layers that keep GGUF-quantized weights quantized (`quantization: gguf`), for CPUs.

A weight stays in the GGUF file's own blocks (`GGUFWeight`: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, and
F16 / F32 matrices), so a decode step reads the quantized bytes (0.56 byte per weight for Q4_1
against 4 for fp32). `csrc/gguf_matmul.c` multiplies them in one of three ways:

- Q4_0 / Q4_1 / Q8_0 at any number of rows where the build has AVX2 (`has_wide_tiles`), else
  below `INT8_GEMM_MIN_ROWS` rows (decode steps, short prompt chunks): the input is
  quantized to int8 per 32-element block and multiplied by integer dot products, llama.cpp's
  arithmetic (`quantize_input_reference` says how the input is rounded);
  `FLEETLM_GGUF_INT8_DOT=0` turns this off. Matrices that take the AVX2 "wide tiles" are
  repacked once when loaded whole (`GGUFWeight.packed`: the same bytes in tiles of eight
  rows, the kernel's own layout);
- otherwise below `GEMM_MIN_ROWS` rows: fp32 activations times the blocks turned into fp32 in
  registers (other types through a few rows dequantized into L1), so the result is
  `x @ dequantize(W).T` up to the order of the sums;
- larger batches (prefill), which are compute-bound: the weight is dequantized to fp32, a
  slice of up to 16 MiB at a time, and oneDNN's GEMM multiplies it.

Below the GEMM a row's result is the same in any batch. Where the kernel does not apply (no C
compiler, not a CPU tensor) the weight is dequantized on the spot with gguf-py, llama.cpp's
own reader: slow, but the same numbers as the fp32 path.

Measured against torch's own CPU ops on the 2-core EPYC of docs/benchmarks.md (built-in
model's shapes): `_weight_int4pack_mm_for_cpu` is exact for Q4_0 / Q4_1 only with fp32
activations, and then takes 1.8 ms for one row of a 1536 x 576 matrix (oneDNN fp32: 0.27 ms;
the bf16 path is fast but rounds the fp16 scales and the activations); `_weight_int8pack_mm`
has one scale per output row, so it cannot hold Q8_0's scale per 32 weights. torchao's CPU
int4 layout runs the same aten op. Hence the kernel of our own.

A layer's weight may arrive in several shards (q, k and v into one fused matrix, each a
tensor of the file, possibly of different types): `QuantizedMatrix` stacks them by rows and
merges neighbours of one type into one block matrix, so a fused projection is one call.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

from fleetlm.kernels import cpu_build, cpu_linear

SOURCE = Path(__file__).parent / "csrc" / "gguf_matmul.c"
TYPES = tuple(GGMLQuantizationType[name]
              for name in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"))
STATUS_MESSAGES = {1: "unsupported GGUF type", 2: "row length not a whole number of blocks",
                   3: "out of memory"}

_int64, _ptr = ctypes.c_int64, ctypes.c_void_p

# From this many input rows (a prefill chunk, a large decode batch) a product dequantizes the
# weight to fp32 and runs a GEMM instead of the block kernel: on the 2-core EPYC of
# docs/benchmarks.md dequantizing a 3072 x 576 Q4_1 matrix takes 0.13 ms and oneDNN then does
# 256 rows in 2.0 ms where the kernel (which dequantizes every block once per 3 rows) takes
# 6.4 ms; the two break even at about 13 rows.
GEMM_MIN_ROWS = 16
# Q4_0 / Q4_1 / Q8_0 products quantize each input row to int8 per 32-element block and
# multiply by integer dot products: llama.cpp's arithmetic for these types. On the AVX2 EPYC
# of docs/benchmarks.md ("Integer dot products") a decode step's linear layers took 1.35x
# less time than with fp32 activations at 1 row and 1.44x at 8, and the kernel beat the
# dequantized weight's GEMM up to 64 rows (182 against 242 ms at 64, 383 against 345 at 128).
# FLEETLM_GGUF_INT8_DOT=0 keeps fp32 activations: then the products are exactly those of
# x @ dequantize(W).T.
INT8_DOT_ENV = "FLEETLM_GGUF_INT8_DOT"
INT8_DOT_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                  GGMLQuantizationType.Q8_0)
INT8_GEMM_MIN_ROWS = 64
# ... except in an AVX2 build (`has_wide_tiles`), whose integer kernels beat the GEMM at every
# size. Q4_0 / Q4_1 take the "wide tiles" (eight weight rows across a vector's lanes, no
# horizontal adds): on the same EPYC a layer's four products at 256 rows take 6.0-10.5 ms
# against 12.8-14.9 (dequantize + oneDNN). Q8_0 keeps the four-row tiles, which still beat
# the GEMM: the LM head (49152 x 576) at 64 / 256 rows in 24.0 / 114.7 ms against 52.9 /
# 177.9, a 3072 x 576 Q8_0 matrix in 1.83 / 6.44 against 3.62 / 7.46. Then a prompt's
# products are the same integer sums as a decode step's, bit for bit.
XQMAX = 127  # input blocks are quantized to [-127, 127]
# Q4_0 / Q4_1 / Q8_0 matrices that the wide tiles multiply are repacked once, when loaded whole,
# into tiles of PACKED_ROWS rows (`GGUFWeight.packed`; csrc/gguf_matmul.c's fleet_gguf_repack
# says the layout): the same bytes, so that a product reads each tile's block as one run of
# bytes in the kernel's own layout instead of transposing eight rows' blocks on every call.
# On the AVX2 EPYC of docs/benchmarks.md a layer's four products at one row took 0.09-0.12 ms
# against 0.13-0.20 unpacked ("Weights repacked at load"), and the built-in model's Q8_0 LM
# head (its tied embedding, looked up in the tiles) 1.23-1.34 ms against 1.49-1.61 ("The LM
# head in tiles"). FLEETLM_GGUF_REPACK=0 keeps GGUF's rows (for comparisons).
PACKED_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
PACKED_ROWS = 8
PACKED_FLAG = 64  # added to the type's code in the kernel's calls
REPACK_ENV = "FLEETLM_GGUF_REPACK"
# Weights dequantized per GEMM call: up to 16 MiB of fp32, so every layer matrix of the built-in
# model (gate_up: 3072 x 576) is one GEMM, and a 49152-row LM head never needs its 113 MB fp32
# copy at once. A 256-token prefill's linear layers on the AVX2 EPYC of docs/benchmarks.md:
# 395-434 ms with 4 MiB slices (gate_up in two GEMMs), 365-372 ms with 16 MiB.
GEMM_SLICE_ELEMENTS = 1 << 22


_MATMUL_ARGS = [_ptr, _int64, _int64, _ptr, _int64, ctypes.c_int, _ptr, ctypes.c_int]
_SIGNATURES = {  # the library's functions: their argument types (each returns a status)
    "fleet_gguf_matmul": _MATMUL_ARGS, "fleet_gguf_matmul_q8": _MATMUL_ARGS,
    "fleet_gguf_dequantize": [_ptr, _int64, _int64, ctypes.c_int, _ptr, ctypes.c_int],
    "fleet_gguf_dequantize_rows": [
        _ptr, _int64, _int64, ctypes.c_int, _ptr, _int64, _ptr, ctypes.c_int],
    "fleet_gguf_quantize_input": [_ptr, _int64, _int64, _ptr],
    "fleet_gguf_wide_tiles": [], "fleet_gguf_packed_types": [],
    "fleet_gguf_repack": [_ptr, _int64, _int64, ctypes.c_int, _ptr, ctypes.c_int, ctypes.c_int],
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    return load_library()


def load_library(flags: tuple[str, ...] = cpu_build.COMPILE_FLAGS) -> ctypes.CDLL | None:
    """The kernel built with `flags` (tests build it for other instruction sets too).
    benchmarks/kernel_ab.py builds older versions too, which may lack the functions added
    since (dequantize_rows, repack): those stay unset, and their callers fall back."""
    library = cpu_build.load(SOURCE, flags)
    if library is not None:
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name, None)
            if function is not None:
                function.argtypes, function.restype = argtypes, ctypes.c_int
        # read once: the kernel's choice for this build, asked by every product
        library.has_wide_tiles = bool(library.fleet_gguf_wide_tiles())
        library.packed_types, library.has_packed_rows = _packed_types(library)
    return library


def int8_dot_enabled() -> bool:
    """Whether Q4_0 / Q4_1 / Q8_0 decode products take int8 activations ($FLEETLM_GGUF_INT8_DOT,
    default on)."""
    return os.environ.get(INT8_DOT_ENV, "1") != "0"


def quantize_input_reference(x: torch.Tensor) -> torch.Tensor:
    """x (m, k) as the int8 kernel sees it: each 32-element block rounded to d * q with
    d = max|x| / 127 and q = round-half-even(x / d), in the kernel's fp32 operations."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / XQMAX
    q = torch.round(blocks / torch.where(d > 0, d, torch.ones_like(d))).clamp(-XQMAX, XQMAX)
    return (q * d).reshape(x.shape)


def is_available() -> bool:
    """Whether the C kernel compiled and loaded (compiles it on first call)."""
    return _library() is not None


def _packed_types(library: ctypes.CDLL) -> tuple[frozenset[GGMLQuantizationType], bool]:
    """The types `library` takes in tiles, and whether its row lookups take tiles: what its
    `fleet_gguf_packed_types` says (row lookups came with it); Q4_0 / Q4_1 for a build from
    before Q8_0 was packed (`fleet_gguf_repack` alone), none before that."""
    if hasattr(library, "fleet_gguf_packed_types"):
        bits = library.fleet_gguf_packed_types()
        return frozenset(t for t in PACKED_TYPES if bits >> int(t) & 1), True
    if hasattr(library, "fleet_gguf_repack"):
        return frozenset((GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)), False
    return frozenset(), False


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"gguf_matmul: {STATUS_MESSAGES.get(status, status)}")


class GGUFWeight:
    """A matrix of `shape` (rows, cols) in GGUF type `qtype`: `data` is uint8, one row of
    blocks per matrix row, or (`packed`, Q4_0 / Q4_1 / Q8_0 only) the same bytes rearranged
    into tiles of PACKED_ROWS rows, which the wide tiles and the kernel's row lookups read:
    every other reader takes `unpacked()`. Quacks like a checkpoint tensor (`shape`,
    `narrow`), so the tensor-parallel loaders take a shard of it without knowing it is
    quantized."""

    __slots__ = ("data", "qtype", "shape", "packed")

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType, cols: int,
                 packed: bool = False) -> None:
        if qtype not in TYPES:
            raise ValueError(f"GGUF type {qtype.name} is not supported; "
                             f"supported: {', '.join(t.name for t in TYPES)}")
        block, _ = GGML_QUANT_SIZES[qtype]
        if data.dtype != torch.uint8 or data.dim() != 2 or cols % block or (
                data.shape[1] != self.row_bytes_of(qtype, cols)):
            raise ValueError(f"{qtype.name} blocks of shape {tuple(data.shape)} do not hold "
                             f"rows of {cols} elements")
        if packed and (qtype not in PACKED_TYPES or data.shape[0] % PACKED_ROWS):
            raise ValueError(f"{qtype.name} rows ({data.shape[0]}) cannot be packed")
        self.data = data
        self.qtype = qtype
        self.shape = torch.Size((data.shape[0], cols))
        self.packed = packed

    @property
    def kernel_type(self) -> int:
        """The type's code in the kernel's calls (with PACKED_FLAG where packed)."""
        return int(self.qtype) | (PACKED_FLAG if self.packed else 0)

    def can_pack(self) -> bool:
        """Whether the products would read this matrix packed: a Q4_0 / Q4_1 / Q8_0 matrix
        of whole tiles where the kernel has wide tiles and int8 activations are on."""
        library = _library()
        return (not self.packed and _INT8_DOT and os.environ.get(REPACK_ENV, "1") != "0"
                and self.shape[0] % PACKED_ROWS == 0 and library is not None
                and library.has_wide_tiles and self.qtype in library.packed_types)

    def repacked(self, packed: bool = True) -> GGUFWeight:
        """This matrix in tiles (`packed`) or in GGUF's rows (a new tensor; self where it is
        so already)."""
        if packed == self.packed:
            return self
        library = _library()
        if library is None:
            raise RuntimeError("packed GGUF matrices need the C kernel, which did not load")
        source = self.data.contiguous()
        out = torch.empty_like(source)
        _check(library.fleet_gguf_repack(source.data_ptr(), self.shape[0], self.shape[1],
                                         int(self.qtype), out.data_ptr(), packed,
                                         torch.get_num_threads()))
        return GGUFWeight(out, self.qtype, self.shape[1], packed)

    def unpacked(self) -> GGUFWeight:
        return self.repacked(False)

    @staticmethod
    def row_bytes_of(qtype: GGMLQuantizationType, cols: int) -> int:
        block, type_size = GGML_QUANT_SIZES[qtype]
        return cols // block * type_size

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def narrow(self, dim: int, start: int, length: int) -> GGUFWeight:
        """Rows, or columns on block boundaries (a row-parallel shard)."""
        if self.packed and not (dim == 0 and start % PACKED_ROWS == length % PACKED_ROWS == 0):
            return self.unpacked().narrow(dim, start, length)
        if dim == 0:
            return GGUFWeight(self.data.narrow(0, start, length), self.qtype, self.shape[1],
                              self.packed)
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        if dim != 1 or start % block or length % block:
            raise ValueError(f"a {self.qtype.name} matrix splits only on its {block}-element "
                             f"blocks; columns {start}..{start + length} are not")
        data = self.data.narrow(1, start // block * type_size, length // block * type_size)
        return GGUFWeight(data.contiguous(), self.qtype, length)

    def dequantize(self) -> torch.Tensor:
        """fp32, by gguf-py (llama.cpp's reference dequantizers): what the kernel must equal."""
        if self.packed:
            return self.unpacked().dequantize()
        values = dequantize(self.data.numpy(), self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows `ids` (an embedding lookup), through the C kernel where it loads."""
        library = _library()
        if self.packed and (library is None or not library.has_packed_rows):
            # the ids' tiles, unpacked; then each id's row in them
            flat = ids.reshape(-1)
            tiles = self.data.view(-1, PACKED_ROWS * self.data.shape[1]).index_select(
                0, torch.div(flat, PACKED_ROWS, rounding_mode="floor"))
            rows = GGUFWeight(tiles.view(-1, self.data.shape[1]), self.qtype, self.shape[1],
                              True).unpacked()
            index = torch.arange(flat.numel()) * PACKED_ROWS + flat % PACKED_ROWS
            return rows.dequantize_rows(index).view(*ids.shape, self.shape[1])
        if library is None or not hasattr(library, "fleet_gguf_dequantize_rows"):
            blocks = GGUFWeight(self.data.index_select(0, ids.reshape(-1)), self.qtype,
                                self.shape[1])
            rows = blocks.dequantize() if library is None else _dequantize(library, blocks)
            return rows.view(*ids.shape, self.shape[1])
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        rows = torch.empty(*ids.shape, self.shape[1])
        data = self.data if self.data.is_contiguous() else self.data.contiguous()
        status = library.fleet_gguf_dequantize_rows(
            data.data_ptr(), self.shape[0], self.shape[1], self.kernel_type,
            flat.data_ptr(), flat.numel(), rows.data_ptr(), torch.get_num_threads())
        if status == 2:  # ERR_SHAPE: rows of whole blocks (checked at construction), so an id
            raise IndexError(f"row ids outside 0..{self.shape[0] - 1}")
        _check(status)
        return rows


def zeros(qtype: GGMLQuantizationType, rows: int, cols: int) -> GGUFWeight:
    """Rows of zeros (every scale 0): padding of a vocabulary shard."""
    data = torch.zeros(rows, GGUFWeight.row_bytes_of(qtype, cols), dtype=torch.uint8)
    return GGUFWeight(data, qtype, cols)


def _dequantize(library: ctypes.CDLL, weight: GGUFWeight) -> torch.Tensor:
    """The whole of `weight` in fp32, by the C kernel on every thread."""
    out = torch.empty(weight.shape[0], weight.shape[1])
    _check(library.fleet_gguf_dequantize(weight.data.data_ptr(), weight.shape[0],
                                         weight.shape[1], int(weight.qtype), out.data_ptr(),
                                         torch.get_num_threads()))
    return out


def _dequantized_matmul(x: torch.Tensor, weight: GGUFWeight, library: ctypes.CDLL) -> torch.Tensor:
    """matmul for many rows: the weight dequantized slice by slice (a layer matrix at once;
    an LM head in 16 MiB slices), each slice multiplied by oneDNN's fp32 GEMM."""
    n, k = weight.shape
    slice_rows = max(1, GEMM_SLICE_ELEMENTS // k)
    if n <= slice_rows:
        return cpu_linear.linear_once(x, _dequantize(library, weight))
    y = torch.empty(x.shape[0], n)
    for start in range(0, n, slice_rows):
        rows = min(slice_rows, n - start)
        dense = _dequantize(library, weight.narrow(0, start, rows))
        y[:, start:start + rows] = cpu_linear.linear_once(x, dense)
    return y


def matmul(x: torch.Tensor, weight: GGUFWeight, library: ctypes.CDLL | None = None,
           int8_dot: bool | None = None) -> torch.Tensor:
    """`x @ dequantize(weight).T` in fp32 for fp32 `x` of shape (m, cols). Below
    GEMM_MIN_ROWS rows (INT8_GEMM_MIN_ROWS for int8 activations) the kernel multiplies the
    blocks, and a row's result is the same in any such batch: for Q4_0 / Q4_1 / Q8_0 with `x`
    quantized per block to int8 when `int8_dot` (default: `int8_dot_enabled()`; the result
    is then `quantize_input_reference(x) @ dequantize(weight).T` up to the order of the
    sums). From there on the weight is dequantized and multiplied by a GEMM, except with
    int8 activations in an AVX2 build: there the integer kernel takes any number of rows, a
    prompt's with the same bits per row as a decode step's."""
    library = library or _library()
    if library is None or x.device.type != "cpu":
        return F.linear(x, weight.dequantize().to(x.device))
    x = x.contiguous()
    if int8_dot is None:
        int8_dot = _INT8_DOT
    int8_dot = int8_dot and weight.qtype in INT8_DOT_TYPES
    if weight.packed and not (int8_dot and library.has_wide_tiles):
        weight = weight.unpacked()  # a path other than the wide tiles (tests, another build)
    if int8_dot and library.has_wide_tiles:
        gemm_min_rows = math.inf  # the integer kernel is faster at any number of rows
    else:
        gemm_min_rows = INT8_GEMM_MIN_ROWS if int8_dot else GEMM_MIN_ROWS
    if x.shape[0] >= gemm_min_rows:
        return _dequantized_matmul(x, weight, library)
    kernel = library.fleet_gguf_matmul_q8 if int8_dot else library.fleet_gguf_matmul
    y = torch.empty(x.shape[0], weight.shape[0])
    _check(kernel(
        x.data_ptr(), x.shape[0], x.shape[1], weight.data.data_ptr(), weight.shape[0],
        weight.kernel_type, y.data_ptr(), torch.get_num_threads()))
    return y


_INT8_DOT = int8_dot_enabled()  # read once: matmul runs 121 times a decode step


class QuantizedMatrix:
    """A layer's weight of `shape`, held as GGUF row ranges (shards loaded one by one)."""

    def __init__(self, shape: tuple[int, int], device: torch.device | str = "cpu") -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"GGUF matrices run on CPUs only; got {device}")
        self.shape = torch.Size(shape)
        self.parts: list[tuple[int, GGUFWeight]] = []  # (first row, rows), sorted
        # The whole matrix as one part, once loaded so: a decode step's linear layers take it
        # straight to the kernel (each call's Python is a good share of a small model's step).
        self._single: GGUFWeight | None = None

    def put(self, row: int, weight: GGUFWeight) -> None:
        """Rows `row`.. of the matrix are `weight`; a neighbour of the same type is merged."""
        if weight.shape[1] != self.shape[1] or row + weight.shape[0] > self.shape[0]:
            raise ValueError(f"shard {tuple(weight.shape)} at row {row} does not fit a "
                             f"weight of shape {tuple(self.shape)}")
        parts = sorted([*self.parts, (row, weight)], key=lambda part: part[0])
        merged: list[tuple[int, GGUFWeight]] = []
        for start, part in ((start, part.unpacked()) for start, part in parts):
            if merged:
                last_start, last = merged[-1]
                if last.qtype == part.qtype and last_start + last.shape[0] == start:
                    data = torch.cat((last.data, part.data))
                    merged[-1] = (last_start, GGUFWeight(data, part.qtype, part.shape[1]))
                    continue
            merged.append((start, part))
        is_single = len(merged) == 1 and merged[0][1].shape[0] == self.shape[0]
        if is_single and merged[0][1].can_pack():  # loaded whole: repacked for the products
            merged = [(0, merged[0][1].repacked())]
        self.parts = merged
        self._single = merged[0][1] if is_single else None

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for _, part in self.parts)

    @property
    def whole(self) -> GGUFWeight | None:
        """The matrix as one block matrix, where it was loaded so (one type, no gaps)."""
        return self._single

    @property
    def qtypes(self) -> list[str]:
        return [part.qtype.name for _, part in self.parts]

    def _check_complete(self) -> None:
        if sum(part.shape[0] for _, part in self.parts) != self.shape[0]:
            raise RuntimeError(f"quantized weight of shape {tuple(self.shape)} was not "
                               f"loaded whole")

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x W^T + b` for x of any float dtype (computed in fp32, returned in x's dtype)."""
        if self._single is not None and bias is None and x.dim() == 2 \
                and x.dtype == torch.float32:
            return matmul(x, self._single)
        self._check_complete()
        rows = x.reshape(-1, self.shape[1]).float()
        outputs = [matmul(rows, part) for _, part in self.parts]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        y = y.view(*x.shape[:-1], self.shape[0]).to(x.dtype)
        return y if bias is None else y + bias

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the matrix, dequantized (an embedding lookup)."""
        if self._single is not None:
            rows = self._single.dequantize_rows(ids)
            return rows if dtype == torch.float32 else rows.to(dtype)
        self._check_complete()
        if len(self.parts) == 1:
            return self.parts[0][1].dequantize_rows(ids).to(dtype)
        out = torch.empty(*ids.shape, self.shape[1], dtype=dtype)
        for start, part in self.parts:
            inside = (ids >= start) & (ids < start + part.shape[0])
            out[inside] = part.dequantize_rows(ids[inside] - start).to(dtype)
        return out
