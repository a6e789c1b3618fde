"""bf16 linear layers at one input row (a decode step of one sequence) on CPUs
(csrc/bf16_gemv.c through ctypes), with the torch reference.

At one input row a linear layer only streams its weight once, so its speed is bytes per
second. oneDNN's packed bf16 GEMM (cpu_linear.py) reached about 30 GB/s on the built-in
model's layers at one row on the 2-core EPYC of docs/benchmarks.md, where the machine streams
about 42; this kernel reads the weight's plain [n, k] layout (the parameter itself: no second
copy) in order and reaches about 42. It runs any number of rows (a tile's weight rows are
reread from cache for each), but in the model's step oneDNN is faster from two rows on. The
products are exact in fp32 and summed in fp32, as oneDNN sums them, in another order; the
result is rounded to bf16 to nearest even. A row's result does not depend on the other rows.

`gemv` runs when `supports` says so: CPU bf16 input and weight, at most MAX_ROWS rows, k a
multiple of 32 and n of 16, no autograd, the library built, and FLEETLM_BF16_GEMV not 0.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from fleetlm.kernels import cpu_build

SOURCE = Path(__file__).parent / "csrc" / "bf16_gemv.c"
# Rows up to which the kernel beats oneDNN's packed GEMM in the built-in model's decode step
# (docs/benchmarks.md, "A bf16 GEMV"): at 2 rows it already lost there, though it won alone.
MAX_ROWS = 1
K_MULTIPLE, N_MULTIPLE = 32, 16


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FLEETLM_BF16_GEMV", "1") == "0":
        return None
    library = cpu_build.load(SOURCE)
    if library is not None:
        library.fleet_bf16_gemv.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_int]
    return library


def is_available() -> bool:
    """Whether the C library compiled and loaded (compiles it on first call)."""
    return _library() is not None


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    n, k = weight.shape
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.shape[-1] == k
            and 0 < x.numel() <= MAX_ROWS * k and k % K_MULTIPLE == 0 and n % N_MULTIPLE == 0
            and weight.is_contiguous() and not torch.is_grad_enabled() and is_available())


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x W^T` in bf16 for x [..., k] with at most MAX_ROWS rows; see `supports`."""
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    status = _library().fleet_bf16_gemv(rows.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                        rows.shape[0], n, k, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"fleet_bf16_gemv rejected the shapes {tuple(x.shape)} x "
                         f"{tuple(weight.shape)} (status {status})")
    return out.view(*x.shape[:-1], n)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same product in fp32, rounded to bf16."""
    return (x.float() @ weight.float().T).to(torch.bfloat16)
