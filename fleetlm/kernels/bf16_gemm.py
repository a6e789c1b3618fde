"""bf16 linear layers on CPUs with AVX512-BF16 and no AMX (csrc/bf16_gemm.c through ctypes),
with the torch reference.

fleetlm's one-row GEMV (bf16_gemv.py) rereads a tile's weight rows for each further input row
and loses to oneDNN's packed GEMM from two rows on; oneDNN reached about two thirds of the
CPU's bf16 rate at 8-32 rows on the built-in model's shapes. This kernel keeps the weight
packed by pairs of k (`pack`: one zmm load is a k pair of 16 outputs) and multiplies up to 8
rows by up to 6 blocks of 16 outputs per tile with `vdpbf16ps`, all sums in registers. On the
AVX-512 EPYC of docs/benchmarks.md it ran the model's layers faster than the GEMV at one row
and than oneDNN's packed GEMM at every row count from 1 to 2048, the LM head within 5% of
oneDNN's either way ("One bf16 GEMM for every batch"), so it takes every bias-free bf16
product there. The products are exact in fp32 and summed in
fp32, in k order, rounded to bf16 to nearest even; a row's result does not depend on the other
rows, so a token computes the same whatever batch it is in.

Where the CPU has AMX, oneDNN's AMX kernels are faster and this one is not used; where it has
no AVX512-BF16, the library reports it cannot run (`is_available` is False).
`gemm` runs when `supports` says so: CPU bf16 input and weight, k even and n a multiple of 16,
no autograd, and FLEETLM_BF16_GEMM not 0.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from fleetlm.kernels import cpu_build

SOURCE = Path(__file__).parent / "csrc" / "bf16_gemm.c"
N_MULTIPLE = 16
GROUP = 6  # blocks of 16 outputs packed side by side (csrc/bf16_gemm.c)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FLEETLM_BF16_GEMM", "1") == "0" or cpu_build.has_cpu_flag("amx_bf16"):
        return None
    library = cpu_build.load(SOURCE)
    if library is None or not library.fleet_bf16_gemm_supported():
        return None
    library.fleet_bf16_gemm.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int]
    return library


def is_available() -> bool:
    """Whether the kernel runs here: built, AVX512-BF16, no AMX (compiles it on first call)."""
    return _library() is not None


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    n, k = weight.shape
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.shape[-1] == k
            and x.numel() > 0 and k % 2 == 0
            and n % N_MULTIPLE == 0 and not torch.is_grad_enabled() and is_available())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W [n, k] as blocks of 16 outputs by k pairs, GROUP blocks side by side (a copy, flat;
    see csrc/bf16_gemm.c): [g][k/2][GROUP][16][2], the last group of what is left."""
    n, k = weight.shape
    blocks = weight.reshape(n // 16, 16, k // 2, 2)
    whole = (n // 16) // GROUP * GROUP
    parts = [blocks[:whole].reshape(-1, GROUP, 16, k // 2, 2).permute(0, 3, 1, 2, 4),
             blocks[whole:].permute(2, 0, 1, 3)]
    return torch.cat([part.reshape(-1) for part in parts])


def gemm(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """`x W^T` in bf16 for x [..., k] and W's `pack`; see `supports`."""
    k = x.shape[-1]
    n = packed.numel() // k
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    status = _library().fleet_bf16_gemm(rows.data_ptr(), packed.data_ptr(), out.data_ptr(),
                                        rows.shape[0], n, k, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"fleet_bf16_gemm rejected the shapes {tuple(x.shape)} x "
                         f"{(n, k)} (status {status})")
    return out.view(*x.shape[:-1], n)


def gemm_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same product in fp32, rounded to bf16."""
    return (x.float() @ weight.float().T).to(torch.bfloat16)
