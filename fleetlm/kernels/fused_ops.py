"""Fused elementwise steps of a decoder layer on CPUs (csrc/fused_ops.c through ctypes), with
their torch references.

A decode step of a small model is mostly per-operation cost, not arithmetic: the torch form of
a residual add + RMSNorm, of SiLU(gate) * up, of neox rotary on q and k or of the K/V write
into a float cache is 2 to 8 torch ops, each a dispatch, an allocation and a pass over memory.
Each kernel here is one ctypes call (a few microseconds) that reads its rows once.

A kernel runs when its library loaded and its tensors are CPU fp32 or bf16 with contiguous
rows and no autograd is needed; anything else takes the reference (the same numbers up to
rounding: fp32 arithmetic, a bf16 result rounded to nearest even).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from fleetlm.kernels import cpu_build

SOURCE = Path(__file__).parent / "csrc" / "fused_ops.c"
DTYPES = (torch.float32, torch.bfloat16)

_int64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_threads = torch.get_num_threads


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cpu_build.load(SOURCE)
    if library is not None:
        library.fleet_add_rms_norm.argtypes = [
            _ptr, _ptr, _ptr, _ptr, _int64, _int64, ctypes.c_float, _int, _int]
        library.fleet_silu_mul.argtypes = [_ptr, _ptr, _int64, _int64, _int, _int]
        library.fleet_rotary.argtypes = [
            _ptr, _int64, _int64, _int64, _int64, _ptr, _ptr, _int, _int]
        library.fleet_write_kv.argtypes = [
            _ptr, _ptr, _int64, _int64, _int64, _int64, _ptr, _int64, _int64, _int64, _int64,
            _ptr, _ptr, _int, _int]
        library.fleet_argmax_rows.argtypes = [_ptr, _int64, _int64, _int64, _ptr, _int]
    return library


def is_available() -> bool:
    """Whether the C library compiled and loaded (compiles it on first call)."""
    return _library() is not None


def _is_plain(x: torch.Tensor) -> bool:
    """A CPU tensor of a kernel dtype with contiguous rows, nothing for autograd to record.
    (Checked on the first tensor of a call; the others must match its dtype.)"""
    return (x.device.type == "cpu" and x.dtype in DTYPES and x.stride(-1) == 1
            and not (x.requires_grad and torch.is_grad_enabled()))


# ---- references ------------------------------------------------------------------------------
def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual), the sum written into x; without a
    residual, (rms_norm(x) * weight, x)."""
    if residual is not None:
        x = x.add_(residual)
    return F.rms_norm(x, weight.shape, weight, eps), x


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotary of x [tokens, heads, head_dim] with cos/sin [tokens, 1, head_dim / 2]
    (a new tensor; computed in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ---- kernels -----------------------------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm_reference` in one pass: x += residual in place, the norm into a new
    tensor."""
    library = _library()
    if (library is None or not _is_plain(x) or not x.is_contiguous()
            or weight.dtype != x.dtype or not weight.is_contiguous()
            or weight.shape != x.shape[-1:] or weight.requires_grad
            or (residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape
                                          or not residual.is_contiguous()))):
        return add_rms_norm_reference(x, residual, weight, eps)
    out = torch.empty_like(x)
    dim = x.shape[-1]
    library.fleet_add_rms_norm(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
        out.data_ptr(), x.numel() // dim, dim, eps, x.dtype == torch.bfloat16, _threads())
    return out, x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_mul_reference` in one pass."""
    library = _library()
    if library is None or not _is_plain(gate_up) or not gate_up.is_contiguous():
        return silu_mul_reference(gate_up)
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], n)
    library.fleet_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n,
                           gate_up.dtype == torch.bfloat16, _threads())
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotary_reference` written into x (returned). x [tokens, heads, head_dim] may be a
    slice of wider rows (the q and k heads of a fused qkv projection): its heads must be
    contiguous, its tokens any stride apart."""
    library = _library()
    tokens, heads, head_dim = x.shape
    if (library is None or not _is_plain(x) or x.stride(1) != head_dim
            or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or not (cos.is_contiguous() and sin.is_contiguous())
            or cos.numel() != tokens * head_dim // 2 or sin.numel() != cos.numel()):
        return x.copy_(rotary_reference(x, cos, sin))
    library.fleet_rotary(x.data_ptr(), tokens, heads, head_dim, x.stride(0), cos.data_ptr(),
                         sin.data_ptr(), x.dtype == torch.bfloat16, _threads())
    return x


def supports_write_kv(key: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `write_kv` can write `key`-like rows into `k_cache` (a float cache of key's
    dtype; an int8 cache has its own writer in `cpu_attention`)."""
    return (key.dtype == k_cache.dtype and _is_plain(key) and k_cache.device.type == "cpu"
            and is_available())


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """`attention.write_kv_cache_reference` for a float cache in one call: key/value
    [num_tokens, num_kv_heads, head_dim] (rows contiguous: slices of a fused projection are
    fine), caches contiguous, slot_mapping int64; slots < 0 are skipped."""
    library = _library()
    assert library is not None and key.dtype == k_cache.dtype, "check supports_write_kv()"
    value = value.to(key.dtype)
    key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous():
        slot_mapping = slot_mapping.to(torch.int64).contiguous()
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    num_slots = num_blocks * block_size
    status = library.fleet_write_kv(
        key.data_ptr(), value.data_ptr(), key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), slot_mapping.data_ptr(), key.shape[0], num_kv_heads, head_dim,
        num_slots, k_cache.data_ptr(), v_cache.data_ptr(), key.dtype == torch.bfloat16,
        _threads())
    if status != 0:
        raise ValueError(f"write_kv_cache: a slot is outside the cache of {num_slots} slots")


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of fp32 rows [rows, n] (int64; the first index of each row's
    largest value, a NaN counting as the largest, as torch), vectorized: torch's CPU argmax
    reads one value at a time."""
    library = _library()
    if (library is None or logits.dim() != 2 or logits.dtype != torch.float32
            or not _is_plain(logits) or 0 in logits.shape):
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    library.fleet_argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1],
                              logits.stride(0), out.data_ptr(), _threads())
    return out
