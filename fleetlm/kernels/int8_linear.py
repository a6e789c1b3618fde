"""W8A8 INT8 linear layers on CPUs: compressed-tensors' `int-quantized` scheme (what LLM
Compressor's W8A8 recipe writes, and `fleetlm quantize --scheme W8A8`).

Weights are int8 with one scale per output row (symmetric, channel-wise); activations are
quantized at run time, one scale per row (token): `scale = max|x| / 127`, `q = round(x / scale)`
in [-127, 127]. `csrc/int8_matmul.c` sums int8 x int8 products exactly in int32 (AVX512-VNNI,
AVX-VNNI, AVX2 or plain loops, as the CPU allows), then `y = sum * x_scale * w_scale + bias` in
fp32. A decode step reads one byte per weight (fp32: four).

Measured against torch's own CPU ops on the 2-core EPYC of docs/benchmarks.md: `torch._int_mm`
is exact but 14x to 30x slower (one row of 3072 x 576: 0.64 ms against this kernel's 0.045 ms,
quantization included; 32 rows: 19.3 against 0.65 ms); `_weight_int8pack_mm` keeps fp32
activations (W8A16, not this scheme) and is slower than oneDNN fp32; `torch.ops.quantized`
quantizes activations per tensor, not per token. Hence the kernel of our own, for every shape
(benchmarks/quantized_linear.py). Where it does not load (no C compiler, not a CPU tensor)
the torch reference below runs: the same numbers, slowly.

Under tensor parallelism a row-parallel layer quantizes each rank's share of the activations
with its own scales (as vLLM does), so its result differs slightly from one rank's.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fleetlm.kernels import cpu_build

SOURCE = Path(__file__).parent / "csrc" / "int8_matmul.c"
QMAX = 127  # activations are quantized to [-QMAX, QMAX]

_int64, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cpu_build.load(SOURCE)
    if library is not None:
        library.fleet_int8_quantize_rows.argtypes = [_ptr, _int64, _int64, _ptr, _ptr, ctypes.c_int]
        library.fleet_int8_gemm.argtypes = [
            _ptr, _ptr, _int64, _int64, _ptr, _ptr, _ptr, _int64, _ptr, ctypes.c_int]
        library.fleet_w8a8_linear.argtypes = [
            _ptr, _int64, _int64, _ptr, _ptr, _ptr, _int64, _ptr, ctypes.c_int]
        for function in (library.fleet_int8_quantize_rows, library.fleet_int8_gemm,
                         library.fleet_w8a8_linear):
            function.restype = ctypes.c_int
        library.fleet_int8_path.restype = ctypes.c_char_p
    return library


def is_available() -> bool:
    """Whether the C kernel compiled and loaded (compiles it on first call)."""
    return _library() is not None


def kernel_path() -> str:
    """The instruction path the C kernel was built for: avx512vnni, avxvnni, avx2 or generic."""
    library = _library()
    return "torch" if library is None else library.fleet_int8_path().decode()


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"int8_matmul: status {status} (out of memory)")


# ---- references (exact: what the kernel must equal) -----------------------------------------
def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row symmetric int8 of fp32 `x` (m, k): (q int8, scale fp32 (m,))."""
    scale = x.abs().amax(dim=1) / QMAX
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / divisor[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def gemm_reference(q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                   weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int32 sums of int8 products, then the kernel's fp32 rescale (and bias)."""
    sums = q.to(torch.int32) @ weight.to(torch.int32).T
    y = sums.float() * x_scale[:, None] * weight_scale[None, :]
    return y if bias is None else y + bias


# ---- the kernel -------------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_reference` through the C kernel (fp32 CPU `x` of shape (m, k))."""
    library = _library()
    if library is None or x.device.type != "cpu":
        return quantize_rows_reference(x)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[0])
    _check(library.fleet_int8_quantize_rows(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(),
                                            scale.data_ptr(), torch.get_num_threads()))
    return q, scale


def _bias_ptr(bias: torch.Tensor | None) -> int | None:
    return None if bias is None else bias.data_ptr()


def gemm(q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
         weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`gemm_reference` through the C kernel (int8 q (m, k), weight (n, k), fp32 scales)."""
    library = _library()
    if library is None or q.device.type != "cpu":
        return gemm_reference(q, x_scale, weight, weight_scale, bias)
    q, x_scale = q.contiguous(), x_scale.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    y = torch.empty(q.shape[0], weight.shape[0])
    _check(library.fleet_int8_gemm(
        q.data_ptr(), x_scale.data_ptr(), q.shape[0], q.shape[1], weight.data_ptr(),
        weight_scale.data_ptr(), _bias_ptr(bias), weight.shape[0], y.data_ptr(),
        torch.get_num_threads()))
    return y


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 `x` (m, k) quantized per row, times int8 `weight` (n, k) with fp32 `weight_scale`
    (n,), plus `bias`: one call of the C kernel, else the references."""
    library = _library()
    if library is None or x.device.type != "cpu":
        q, x_scale = quantize_rows_reference(x)
        return gemm_reference(q, x_scale, weight, weight_scale, bias)
    x = x.contiguous()
    bias = None if bias is None else bias.float().contiguous()
    y = torch.empty(x.shape[0], weight.shape[0])
    _check(library.fleet_w8a8_linear(
        x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight_scale.data_ptr(),
        _bias_ptr(bias), weight.shape[0], y.data_ptr(), torch.get_num_threads()))
    return y


# ---- checkpoint tensors and layer weights ---------------------------------------------------
def _read(tensor) -> torch.Tensor:
    """All of a checkpoint tensor (a lazy one is read now)."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.narrow(0, 0, tensor.shape[0])


class Int8Weight:
    """A checkpoint matrix (rows, cols) of int8 values with one scale per row. `data` and
    `scale` may be lazy (read when narrowed). Quacks like a checkpoint tensor (`shape`,
    `narrow`), so the tensor-parallel loaders take a shard without knowing it is quantized:
    rows carry their scales, a column shard keeps every row's scale."""

    __slots__ = ("data", "scale", "shape")

    def __init__(self, data, scale) -> None:
        if len(data.shape) != 2 or tuple(scale.shape) not in (
                (data.shape[0],), (data.shape[0], 1)):
            raise ValueError(f"int8 weight of shape {tuple(data.shape)} needs one scale per "
                             f"row; got scales of shape {tuple(scale.shape)}")
        self.data = data
        self.scale = scale
        self.shape = torch.Size(data.shape)

    def narrow(self, dim: int, start: int, length: int) -> Int8Weight:
        if dim == 0:  # type(self): a subclass (`Fp8Weight`) narrows to its own kind
            return type(self)(self.data.narrow(0, start, length),
                              self.scale.narrow(0, start, length))
        return type(self)(self.data.narrow(dim, start, length), self.scale)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 data, fp32 scales of shape (rows,)), read from the file if lazy."""
        data = _read(self.data)
        if data.dtype != torch.int8:
            raise ValueError(f"an int8 weight holds {data.dtype} values")
        return data.contiguous(), _read(self.scale).float().reshape(-1).contiguous()

    def dequantize(self) -> torch.Tensor:
        data, scale = self.materialize()
        return data.float() * scale[:, None]


class Int8Matrix:
    """A layer's W8A8 weight of `shape` on `device`, filled by row ranges (q, k and v, or gate
    and up, are loaded one by one into one matrix, so a fused projection is one kernel call).
    Subclasses (`Fp8Matrix`) change the element type and the product."""

    DTYPE = torch.int8

    def __init__(self, shape: tuple[int, int], device: torch.device | str = "cpu") -> None:
        self.shape = torch.Size(shape)
        self.data = torch.zeros(shape, dtype=self.DTYPE, device=device)
        self.scale = torch.zeros(shape[0], device=device)
        self._num_rows_loaded = 0

    def put(self, row: int, weight: Int8Weight) -> None:
        """Rows `row`.. of the matrix are `weight`."""
        if weight.shape[1] != self.shape[1] or row + weight.shape[0] > self.shape[0]:
            raise ValueError(f"shard {tuple(weight.shape)} at row {row} does not fit a "
                             f"weight of shape {tuple(self.shape)}")
        data, scale = weight.materialize()
        self.data[row:row + data.shape[0]] = data.to(self.data.device)
        self.scale[row:row + data.shape[0]] = scale.to(self.scale.device)
        self._num_rows_loaded += data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() + self.scale.numel() * self.scale.element_size()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x W^T + b` for x of any float dtype, returned in x's dtype."""
        if self._num_rows_loaded != self.shape[0]:
            raise RuntimeError(f"{self.DTYPE} weight of shape {tuple(self.shape)} was not "
                               f"loaded whole")
        y = self._multiply(x.reshape(-1, self.shape[1]), bias)
        return y.view(*x.shape[:-1], self.shape[0]).to(x.dtype)

    def _multiply(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """rows (m, k) times this matrix: computed in fp32 by the int8 kernel."""
        return w8a8_linear(rows.float(), self.data, self.scale, bias)
