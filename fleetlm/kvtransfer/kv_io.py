"""KV blocks to bytes and back: the one place that knows the paged cache's tensor layout.

A rank's cache is one (K, V) pair per layer, each (num_blocks, block_size, num_kv_heads,
head_dim). A run of blocks travels as one buffer shaped (layers, 2, blocks, block_size,
num_kv_heads, head_dim) in the cache's dtype.
"""

from __future__ import annotations

import torch

from fleetlm.kvtransfer.params import KVLayout

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def layout_of(kv_caches: KVCaches) -> KVLayout:
    _, block_size, num_kv_heads, head_dim = kv_caches[0][0].shape
    dtype = str(kv_caches[0][0].dtype).removeprefix("torch.")
    return KVLayout(dtype, block_size, len(kv_caches), num_kv_heads, head_dim)


def gather_blocks(kv_caches: KVCaches, block_ids: list[int]) -> bytes:
    index = torch.tensor(block_ids, device=kv_caches[0][0].device)
    with torch.inference_mode():
        stacked = torch.stack([torch.stack((k[index], v[index])) for k, v in kv_caches])
        return stacked.view(torch.uint8).cpu().numpy().tobytes()


def scatter_blocks(kv_caches: KVCaches, block_ids: list[int], data: bytearray,
                   layout: KVLayout) -> None:
    """Write `data` (as `gather_blocks` made it, for len(block_ids) blocks) into the blocks."""
    k_cache = kv_caches[0][0]
    shape = (layout.num_layers, 2, len(block_ids), *k_cache.shape[1:])
    values = torch.frombuffer(data, dtype=torch.uint8).view(k_cache.dtype).view(shape)
    index = torch.tensor(block_ids, device=k_cache.device)
    with torch.inference_mode():
        values = values.to(k_cache.device)
        for layer, (k, v) in enumerate(kv_caches):
            k[index] = values[layer, 0]
            v[index] = values[layer, 1]
