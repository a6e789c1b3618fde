"""KV blocks to bytes and back: the one place that knows the paged cache's tensor layout.

A rank's cache is one (K, V) pair per layer of its pipeline stage, each (num_blocks,
block_size, num_kv_heads, head_dim) over its tensor-parallel share of the KV heads. A run
of blocks travels as one buffer shaped (layers, 2, blocks, block_size, heads, head_dim) in
the cache's dtype, for a range of the rank's layers and heads (a decode rank split
differently asks a prefill rank for only the part it holds). An int8 cache's last dim is
head_dim + 4, each row's scale (`fleetlm.kernels.kv_quant`), so its blocks travel with their
scales.
"""

from __future__ import annotations

import numpy as np
import torch

from fleetlm.kernels.kv_quant import head_dim_of
from fleetlm.kvtransfer.params import KVLayout

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]
Range = tuple[int, int]  # [start, end)


def layout_of(kv_caches: KVCaches, num_layers: int | None = None,
              num_kv_heads: int | None = None) -> KVLayout:
    """The layout of a cache holding `num_layers` layers and `num_kv_heads` heads in all
    (default: what this rank's cache holds)."""
    k_cache = kv_caches[0][0]
    _, block_size, rank_heads, _ = k_cache.shape
    dtype = str(k_cache.dtype).removeprefix("torch.")
    return KVLayout(dtype, block_size, num_layers or len(kv_caches),
                    num_kv_heads or rank_heads, head_dim_of(k_cache))


def _parts(kv_caches: KVCaches, layers: Range | None, heads: Range | None):
    first, last = layers or (0, len(kv_caches))
    head_slice = slice(*heads) if heads is not None else slice(None)
    return kv_caches[first:last], head_slice


def gather_blocks(kv_caches: KVCaches, block_ids: list[int], layers: Range | None = None,
                  heads: Range | None = None, out=None) -> np.ndarray:
    """The blocks' K and V over the rank's `layers` and `heads` (local indices; all by
    default) as a flat uint8 array: written into the start of `out` (a writable buffer, e.g.
    a shared-memory file) when it is large enough, else into a new one."""
    caches, head_slice = _parts(kv_caches, layers, heads)
    k_cache = kv_caches[0][0]
    _, block_size, num_heads, head_dim = k_cache[:, :, head_slice].shape
    shape = (len(caches), 2, len(block_ids), block_size, num_heads, head_dim)
    num_bytes = torch.Size(shape).numel() * k_cache.element_size()
    if out is not None and len(out) >= num_bytes:
        flat = torch.frombuffer(out, dtype=torch.uint8, count=num_bytes)
    else:
        flat = torch.empty(num_bytes, dtype=torch.uint8)
    values = flat.view(k_cache.dtype).view(shape)
    index = torch.tensor(block_ids, device=k_cache.device)
    with torch.inference_mode():
        for layer, (k, v) in enumerate(caches):  # one copy each, straight into place
            for source, target in ((k, values[layer, 0]), (v, values[layer, 1])):
                part = source[:, :, head_slice]
                if source.device == target.device:
                    torch.index_select(part, 0, index, out=target)
                else:
                    target.copy_(part.index_select(0, index))
    return flat.numpy()


def scatter_blocks(kv_caches: KVCaches, block_ids: list[int], data: bytearray,
                   layers: Range | None = None, heads: Range | None = None) -> None:
    """Write `data` (as `gather_blocks` made it, for len(block_ids) blocks, over `layers`
    and `heads` of this rank: local indices, all by default) into the blocks."""
    caches, head_slice = _parts(kv_caches, layers, heads)
    k_cache = kv_caches[0][0]
    _, block_size, num_heads, head_dim = k_cache.shape
    if heads is not None:
        num_heads = heads[1] - heads[0]
    shape = (len(caches), 2, len(block_ids), block_size, num_heads, head_dim)
    values = torch.frombuffer(data, dtype=torch.uint8).view(k_cache.dtype).view(shape)
    index = torch.tensor(block_ids, device=k_cache.device)
    with torch.inference_mode():
        values = values.to(k_cache.device)
        for layer, (k, v) in enumerate(caches):
            k[index, :, head_slice] = values[layer, 0]
            v[index, :, head_slice] = values[layer, 1]
