"""fp32 and bf16 linear layers on CPU through oneDNN with prepacked weights (torch's own ops).

`F.linear` on CPU goes to MKL, which re-reads the weight for every few input rows: on the
2-core EPYC of docs/benchmarks.md the lm_head of the built-in model (49152 x 576) takes
18 ms for one row and 47 ms for five, so a verify pass of speculative decoding or a batch of
eight costs nearly what eight single steps do. oneDNN with the weight reordered once into its
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, as vLLM's CPU build and IPEX do)
takes 9-12 ms for 1-8 rows there (benchmarks/gemm_backends.py). bf16 goes to oneDNN in
`F.linear` too, but with the weight in its plain layout: on an AVX512-BF16 EPYC the packed
copy cuts the model's linear layers at one row from 0.23 to 0.10 ms a layer and the lm_head
from 2.2 to 0.7 ms, bit for bit the same results. The packed copy is a second copy of the
weight in memory.

On a CPU with AVX512-BF16 and no AMX a bias-free bf16 product goes to fleetlm's own GEMM
instead (`bf16_gemm.py`, on a copy of the weight packed by k pairs, which takes the place of
oneDNN's), which ran the model's layers faster than oneDNN at every row count from 1 to 2048
there; elsewhere one of one row (a decode step
of one sequence) goes to fleetlm's GEMV (`bf16_gemv.py`), which streams the plain weight
faster than oneDNN reads its packed copy.

`PackedLinear` holds one weight's packed copy, made on first use and remade whenever the
weight changes (its storage or its version counter: weight loaders write through the
parameter, never through `.data`; a weight made under `torch.inference_mode` has no counter
and is keyed by its storage alone). Anything else (autograd, other dtypes, other devices,
`FLEETLM_ONEDNN_LINEAR=0`, a torch without oneDNN) takes `F.linear`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from fleetlm.kernels import bf16_gemm, bf16_gemv

# oneDNN chooses the packed layout for an expected number of input rows; 8 is within a few
# per cent of the best layout from 1 to 256 rows on the shapes of the built-in model.
PACK_ROWS_HINT = 8


@functools.cache
def is_available() -> bool:
    """oneDNN is built into this torch and not switched off by FLEETLM_ONEDNN_LINEAR=0."""
    if os.environ.get("FLEETLM_ONEDNN_LINEAR", "1") == "0":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def packed_dtypes() -> frozenset[torch.dtype]:
    """fp32 always; bf16 where oneDNN runs it natively (AVX512-BF16 or AMX), where the packed
    weight is bit for bit F.linear's and 2-3x faster at 1-8 rows (docs/benchmarks.md)."""
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return frozenset((torch.float32, torch.bfloat16))
    return frozenset((torch.float32,))


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == weight.dtype and weight.dim() == 2 and x.numel() > 0
            and not torch.is_grad_enabled() and is_available()
            and x.dtype in packed_dtypes())


class PackedLinear:
    """`y = x W^T + b` with W packed for oneDNN (or for fleetlm's bf16 GEMM) once per
    weight version."""

    __slots__ = ("_gemm_key", "_gemm_packed", "_key", "_packed")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None
        self._gemm_key: tuple | None = None
        self._gemm_packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None and bf16_gemm.supports(x, weight):  # AVX512-BF16 without AMX
            key = _version_key(weight)
            if key != self._gemm_key:
                self._gemm_packed = bf16_gemm.pack(weight)
                self._gemm_key = key
            return bf16_gemm.gemm(x, self._gemm_packed)
        if bias is None and bf16_gemv.supports(x, weight):  # one row: bytes decide
            return bf16_gemv.gemv(x, weight)
        if not supports(x, weight):
            return F.linear(x, weight, bias)
        key = _version_key(weight)
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed, bias, "none",
                                                  [], "")


def _version_key(weight: torch.Tensor) -> tuple:
    """What a packed copy of `weight` stays valid for. An inference tensor (made under
    torch.inference_mode) has no version counter: it is keyed by its storage alone (fleetlm
    loads weights once, before the first step)."""
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, tuple(weight.shape))


def linear_once(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x W^T` for a weight used once (a GGUF slice dequantized for one product): oneDNN on
    the plain layout, since packing it would cost more than it saves; else `F.linear`."""
    if not supports(x, weight):
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")
