"""The C paged-attention kernel (csrc/paged_attention.c) for CPUs, bound through ctypes.

One entry point serves decode (one query token per sequence) and prefill with earlier context
(packed query tokens, causal with lower-right alignment). It runs on as many OpenMP threads
as `torch.get_num_threads()`; the library links the same `libgomp.so.1` that torch has
already loaded, so both share one thread pool.

Contract beyond `attention.py`'s: CPU tensors, contiguous caches of dtype fp32, bf16 or int8
(`kv_quant`'s layout), head_dim a multiple of `HEAD_DIM_MULTIPLE`. `write_kv_cache_int8`
quantizes K/V into an int8 cache, exactly as `kv_quant.quantize_rows` does. `supports()` says whether a call qualifies; the
dispatcher falls back to the torch reference otherwise.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fleetlm.kernels import cpu_build, kv_quant

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
KV_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
HEAD_DIM_MULTIPLE = 16  # DIM_CHUNK in the C source
ROWS_PER_PREFILL_TASK = 32  # query rows (tokens x heads of one kv group) one task scores
STATUS_MESSAGES = {
    1: "unsupported shape or dtype",
    2: "a block table row is too short for its seq_len or names a block outside the cache",
    3: "a sequence's seq_len is shorter than its query length",
    4: "out of memory",
}

_int64, _ptr = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (
    [_ptr, _ptr, _ptr, ctypes.c_int]  # query, k_cache, v_cache, kv dtype code
    + [_int64] * 4  # num_blocks, block_size, num_kv_heads, head_dim
    + [_ptr, _ptr, _ptr]  # cu_seqlens_q (NULL for decode), seq_lens, block_tables
    + [_int64] * 4  # max_blocks, num_seqs, num_heads, tokens_per_task
    + [ctypes.c_float, _ptr, ctypes.c_int]  # scale, out, num_threads
)
_WRITE_ARGTYPES = (
    [_ptr, _ptr, ctypes.c_int]  # key, value, is_bf16
    + [_int64] * 4  # token and head strides of key, then of value
    + [_ptr] + [_int64] * 4  # slot_mapping, num_tokens, num_kv_heads, head_dim, num_slots
    + [_ptr, _ptr, ctypes.c_int]  # k_cache, v_cache, num_threads
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cpu_build.load(SOURCE)
    if library is not None:
        library.fleet_paged_attention.argtypes = _ARGTYPES
        library.fleet_paged_attention.restype = ctypes.c_int
        library.fleet_write_kv_int8.argtypes = _WRITE_ARGTYPES
        library.fleet_write_kv_int8.restype = ctypes.c_int
    return library


def is_available() -> bool:
    """Whether the C library compiled and loaded (compiles it on first call)."""
    return _library() is not None


def supports(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the C kernel can serve a call with these tensors (caches, or fresh key/value)."""
    return (
        query.device.type == "cpu"
        and k_cache.device.type == "cpu"
        and k_cache.dtype in KV_DTYPE_CODES
        and v_cache.dtype == k_cache.dtype
        and kv_quant.head_dim_of(k_cache) % HEAD_DIM_MULTIPLE == 0
        and is_available()
    )


def supports_write(key: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `write_kv_cache_int8` can write `key`-like tensors into `cache`."""
    return (key.device.type == "cpu" and kv_quant.is_quantized(cache)
            and key.dtype in (torch.float32, torch.bfloat16)
            and key.shape[-1] % HEAD_DIM_MULTIPLE == 0 and is_available())


def write_kv_cache_int8(key, value, k_cache, v_cache, slot_mapping) -> None:
    """`attention.write_kv_cache` into an int8 cache: key/value `[num_tokens, num_kv_heads,
    head_dim]` (fp32 or bf16, rows contiguous: slices of a fused projection are fine)."""
    library = _library()
    assert library is not None and kv_quant.is_quantized(k_cache), "check supports_write()"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    value = value.to(key.dtype)
    key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    status = library.fleet_write_kv_int8(
        key.data_ptr(), value.data_ptr(), int(key.dtype == torch.bfloat16),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        slot_mapping.data_ptr(), key.shape[0], num_kv_heads, key.shape[2],
        num_blocks * block_size, k_cache.data_ptr(), v_cache.data_ptr(),
        torch.get_num_threads())
    if status != 0:
        raise ValueError(f"write_kv_cache: a slot is outside the cache of "
                         f"{num_blocks * block_size} slots")


def paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale):
    """Decode attention; same contract as `attention.paged_decode_attention`."""
    return _run(query, k_cache, v_cache, None, seq_lens, block_tables, scale, 1)


def paged_prefill_attention(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
                            scale):
    """Prefill with context; same contract as `attention.paged_prefill_attention`."""
    group = query.shape[1] // k_cache.shape[2]
    tokens_per_task = max(1, ROWS_PER_PREFILL_TASK // group)
    return _run(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                tokens_per_task)


def prefill_attention_no_cache(query, key, value, cu_seqlens_q, scale):
    """`attention.prefill_attention_no_cache`: the fresh key/value `[num_tokens, num_kv_heads,
    head_dim]` serve as a cache of one-token blocks, sequence s's j-th block being token
    `cu_seqlens_q[s] + j`, so nothing is copied."""
    cu_seqlens_q = cu_seqlens_q.to(torch.int32)
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    if q_lens.numel() == 0:
        return torch.empty_like(query)
    offsets = torch.arange(int(q_lens.max()), dtype=torch.int32)
    block_tables = (cu_seqlens_q[:-1, None] + offsets).clamp_(max=max(key.shape[0] - 1, 0))
    k_cache, v_cache = key.contiguous().unsqueeze(1), value.contiguous().unsqueeze(1)
    return paged_prefill_attention(query, k_cache, v_cache, cu_seqlens_q, q_lens, block_tables,
                                   scale)


def _run(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
         tokens_per_task) -> torch.Tensor:
    library = _library()
    assert library is not None and k_cache.dtype == v_cache.dtype, "check supports() first"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    head_dim = kv_quant.head_dim_of(k_cache)
    query_f32 = query.to(torch.float32).contiguous()
    out = torch.empty_like(query_f32)
    seq_lens = seq_lens.to(torch.int32).contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    if cu_seqlens_q is not None:
        cu_seqlens_q = cu_seqlens_q.to(torch.int32).contiguous()
    status = library.fleet_paged_attention(
        query_f32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        KV_DTYPE_CODES[k_cache.dtype], num_blocks, block_size, num_kv_heads, head_dim,
        None if cu_seqlens_q is None else cu_seqlens_q.data_ptr(),
        seq_lens.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        seq_lens.shape[0], query.shape[1], tokens_per_task, scale, out.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"paged attention: {STATUS_MESSAGES.get(status, status)}")
    return out.to(query.dtype)
