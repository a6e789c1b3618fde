"""int8 KV cache (`kv_cache_dtype: int8`): the layout and its torch quantize / dequantize.

An int8 cache is one int8 tensor `[num_blocks, block_size, num_kv_heads, head_dim + 4]`: each
(slot, KV head) row holds head_dim int8 values followed by their float32 scale in the row's
last 4 bytes (native byte order). The value is `q * scale`, with `scale = absmax / 127` over
the row (symmetric, per token and head; 0 for an all-zero row), so a row is written once and
never requantized: a later token's KV cannot change an earlier token's scale. Keeping the
scale inside the row keeps a block self-contained: whatever moves blocks (prefix caching, the
KV-transfer layer's bytes, a head slice of a tensor-parallel rank) carries the scales along.

Bytes per (slot, head): head_dim + 4, against 4 * head_dim in float32 (3.8x fewer at
head_dim 64) or 2 * head_dim in bf16.
"""

from __future__ import annotations

import torch

# kv_cache_dtype -> the cache tensor's dtype: int8 on CPUs (this module's layout), float8 e4m3
# on CUDA (`triton_attention`: cast on write and read, no scales)
KV_CACHE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
SCALE_BYTES = 4  # one float32 per (slot, head) row
QMAX = 127.0


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def is_rounded(cache: torch.Tensor) -> bool:
    """Whether the cache holds K/V rounded below the model's precision (int8 or float8)."""
    return cache.dtype in KV_CACHE_DTYPES.values()


def head_dim_of(cache: torch.Tensor) -> int:
    """The head_dim a cache (or a row of it) holds: its last dim, less the scale bytes."""
    return cache.shape[-1] - SCALE_BYTES if is_quantized(cache) else cache.shape[-1]


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """The cache's last dim for `head_dim` in `dtype`."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of packed rows `[..., head_dim + 4]`: the int8 values `[..., head_dim]` and the
    float32 scales `[..., 1]`."""
    head_dim = head_dim_of(rows)
    return rows[..., :head_dim], rows[..., head_dim:].view(torch.float32)


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """`x [..., head_dim]` (any float dtype) as packed int8 rows `[..., head_dim + 4]`."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / QMAX
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    rows = torch.empty((*x.shape[:-1], x.shape[-1] + SCALE_BYTES), dtype=torch.int8,
                       device=x.device)
    values, scales = split_rows(rows)
    values.copy_((x * inverse).round_().clamp_(-QMAX, QMAX))
    scales.copy_(scale)
    return rows


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed int8 rows `[..., head_dim + 4]` back to `[..., head_dim]` in `dtype`."""
    values, scales = split_rows(rows)
    return (values.float() * scales).to(dtype)


def as_float(cache_part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows gathered from a cache, in `dtype`: dequantized if int8, else cast."""
    return dequantize_rows(cache_part, dtype) if is_quantized(cache_part) else \
        cache_part.to(dtype)
