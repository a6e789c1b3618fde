"""Paged attention: the public entry points the model runner calls, and their torch references.

KV cache, per layer: `k_cache` and `v_cache`, each `[num_blocks, block_size, num_kv_heads,
head_dim]` and contiguous; the token at slot `s` lives at block `s // block_size`, offset
`s % block_size`. `block_tables[i]` lists sequence i's blocks in order (entries past its last
used block are ignored). Query head `h` reads kv head `h // (num_heads // num_kv_heads)` (GQA).

Dispatch by device: CUDA runs the Triton kernels (`triton_attention`); CPU runs the C kernel
(`cpu_attention`; the K/V write into a float cache: `fused_ops`) when it compiled and supports
the call, else the torch reference. The `*_reference` functions are plain torch, public so
tests can compare against them.

An int8 cache (`kv_quant`: `[num_blocks, block_size, num_kv_heads, head_dim + 4]`, each row's
float32 scale in its last 4 bytes) is quantized on write and dequantized on read by the C
kernel and the references; the Triton kernels read float caches only.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from fleetlm.kernels import cpu_attention, fused_ops, kv_quant


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store key/value `[num_tokens, num_kv_heads, head_dim]` at `slot_mapping [num_tokens]`.

    Slots < 0 (padding tokens) are skipped. Values are cast to the cache dtype, or quantized
    into an int8 cache.
    """
    _check_write(key, value, k_cache, v_cache, slot_mapping)
    triton_module = _triton_for(key, k_cache)
    if triton_module is not None:
        triton_module.write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    elif kv_quant.is_quantized(k_cache):
        if cpu_attention.supports_write(key, k_cache):
            cpu_attention.write_kv_cache_int8(key, value, k_cache, v_cache, slot_mapping)
        else:
            write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping)
    elif fused_ops.supports_write_kv(key, k_cache):
        fused_ops.write_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Attention of one query token per sequence, the last position, over its cached KV.

    query `[num_seqs, num_heads, head_dim]`; block_tables `[num_seqs, max_blocks]` int32;
    seq_lens `[num_seqs]` int32, the kv length including this token (>= 1), whose KV must
    already be written. Returns `[num_seqs, num_heads, head_dim]` in query.dtype.
    """
    _check_paged(query, k_cache, v_cache, block_tables, seq_lens)
    if query.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"decode takes one query token per sequence: {query.shape[0]} tokens "
                         f"for {seq_lens.shape[0]} sequences")
    triton_module = _triton_for(query, k_cache)
    if triton_module is not None:
        return triton_module.paged_decode_attention(
            query, k_cache, v_cache, block_tables, seq_lens, scale)
    if cpu_attention.supports(query, k_cache, v_cache):
        return cpu_attention.paged_decode_attention(
            query, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_attention_reference(query, k_cache, v_cache, block_tables, seq_lens,
                                            scale)


def paged_prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            block_tables: torch.Tensor, scale: float,
                            max_seqlen_q: int | None = None) -> torch.Tensor:
    """Causal attention of packed query chunks over their sequences' cached KV.

    query `[num_tokens, num_heads, head_dim]`; sequence s owns query rows
    `cu_seqlens_q[s]:cu_seqlens_q[s+1]` (q_len of them) and kv length `seq_lens[s] >= q_len`,
    all of it already in the cache. Lower-right causal alignment: query i of sequence s sits
    at position `seq_len - q_len + i` and sees kv positions up to and including it. Returns
    `[num_tokens, num_heads, head_dim]` in query.dtype. `max_seqlen_q` (the longest q_len),
    when the caller knows it, spares the CUDA path a device sync.
    """
    _check_paged(query, k_cache, v_cache, block_tables, seq_lens)
    if cu_seqlens_q.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(f"cu_seqlens_q must have num_seqs + 1 = {seq_lens.shape[0] + 1} "
                         f"entries, got shape {tuple(cu_seqlens_q.shape)}")
    args = (query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)
    triton_module = _triton_for(query, k_cache)
    if triton_module is not None:
        return triton_module.paged_prefill_attention(*args, max_seqlen_q=max_seqlen_q)
    if cpu_attention.supports(query, k_cache, v_cache):
        return cpu_attention.paged_prefill_attention(*args)
    return paged_prefill_attention_reference(*args)


def prefill_attention_no_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of packed prompts that have no earlier context (seq_len == q_len).

    query `[num_tokens, num_heads, head_dim]`, key/value `[num_tokens, num_kv_heads,
    head_dim]` the fresh projections, so nothing is gathered from the cache. Sequence s owns
    rows `cu_seqlens_q[s]:cu_seqlens_q[s+1]`. Returns `[num_tokens, num_heads, head_dim]`.
    CUDA runs SDPA per sequence (flash attention); CPU runs the C kernel when it can.
    """
    if key.dim() != 3 or key.shape != value.shape or key.shape[0] != query.shape[0]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must be "
                         f"[{query.shape[0]}, num_kv_heads, head_dim] like query")
    _check_heads(query.shape[1], key.shape[1])
    if not query.is_cuda and cpu_attention.supports(query, key, value):
        return cpu_attention.prefill_attention_no_cache(query, key, value, cu_seqlens_q, scale)
    return prefill_attention_no_cache_reference(query, key, value, cu_seqlens_q, scale)


def prefill_attention_no_cache_reference(query, key, value, cu_seqlens_q,
                                         scale) -> torch.Tensor:
    """Torch reference of `prefill_attention_no_cache`: causal SDPA per sequence."""
    bounds = cu_seqlens_q.tolist()
    out = torch.empty_like(query)
    for begin, end in zip(bounds[:-1], bounds[1:]):
        out[begin:end] = _sdpa(query[begin:end], key[begin:end], value[begin:end], scale,
                               is_causal=True)
    return out


def write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Torch reference of `write_kv_cache`."""
    if bool((slot_mapping < 0).any()):
        is_real = slot_mapping >= 0
        key, value, slot_mapping = key[is_real], value[is_real], slot_mapping[is_real]
    num_kv_heads, row = k_cache.shape[2:]
    for cache, rows in ((k_cache, key), (v_cache, value)):
        rows = kv_quant.quantize_rows(rows) if kv_quant.is_quantized(cache) else \
            rows.to(cache.dtype)
        cache.view(-1, num_kv_heads, row).index_copy_(0, slot_mapping, rows)


def paged_decode_attention_reference(query, k_cache, v_cache, block_tables, seq_lens,
                                     scale) -> torch.Tensor:
    """Torch reference of `paged_decode_attention`: gather every sequence's blocks, then
    one masked SDPA over the batch."""
    block_size = k_cache.shape[1]
    max_len = int(seq_lens.max())
    num_used_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_used_blocks].long().clamp(0, k_cache.shape[0] - 1)
    keys, values = (  # [num_seqs, max_len, kv_heads, dim]
        kv_quant.as_float(cache[tables].flatten(1, 2)[:, :max_len], query.dtype)
        for cache in (k_cache, v_cache))
    positions = torch.arange(max_len, device=query.device)
    is_visible = positions[None, :] < seq_lens[:, None].to(query.device)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=is_visible[:, None, None, :],
        scale=scale, enable_gqa=True)
    return out.squeeze(2)


def paged_prefill_attention_reference(query, k_cache, v_cache, cu_seqlens_q, seq_lens,
                                      block_tables, scale) -> torch.Tensor:
    """Torch reference of `paged_prefill_attention`: per sequence, gather its KV and run
    SDPA with a lower-right causal mask."""
    bounds, kv_lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    out = torch.empty_like(query)
    for seq, (begin, end, kv_len) in enumerate(zip(bounds[:-1], bounds[1:], kv_lens)):
        if kv_len < end - begin:
            raise ValueError(f"sequence {seq}: seq_len {kv_len} < query length {end - begin}")
        keys, values = (kv_quant.as_float(_gather_sequence(cache, block_tables[seq], kv_len),
                                          query.dtype) for cache in (k_cache, v_cache))
        out[begin:end] = _sdpa(query[begin:end], keys, values, scale, is_causal=False)
    return out


def _gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, kv_len: int):
    """One sequence's first kv_len tokens, `[kv_len, num_kv_heads, head_dim]`."""
    num_used_blocks = -(-kv_len // cache.shape[1])
    return cache[block_table[:num_used_blocks].long()].flatten(0, 1)[:kv_len]


def _sdpa(query, key, value, scale, is_causal):
    """SDPA on `[tokens, heads, dim]` tensors; without is_causal, a lower-right causal mask."""
    q_len, kv_len = query.shape[0], key.shape[0]
    mask = None
    if not is_causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        mask = mask.tril(diagonal=kv_len - q_len)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), attn_mask=mask,
        is_causal=is_causal, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


@functools.cache
def _triton_module() -> types.ModuleType | None:
    try:
        from fleetlm.kernels import triton_attention
    except ImportError:
        return None
    return triton_attention


def _triton_for(tensor: torch.Tensor, cache: torch.Tensor | None = None,
                ) -> types.ModuleType | None:
    """The Triton kernels when `tensor` lives on CUDA and Triton imports, else None. They
    read float caches only: an int8 `cache` on CUDA is refused."""
    if cache is not None and tensor.is_cuda and kv_quant.is_quantized(cache):
        raise ValueError("an int8 KV cache (kv_cache_dtype int8) runs on CPU only")
    return _triton_module() if tensor.is_cuda else None


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads "
                         f"{num_kv_heads}")


def _check_write(key, value, k_cache, v_cache, slot_mapping) -> None:
    _check_cache(k_cache, v_cache)
    head_dim = kv_quant.head_dim_of(k_cache)
    if key.shape != value.shape or key.shape[1:] != (k_cache.shape[2], head_dim):
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} must be "
                         f"[num_tokens, {k_cache.shape[2]}, {head_dim}]")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must have shape ({key.shape[0]},), "
                         f"got {tuple(slot_mapping.shape)}")


def _check_paged(query, k_cache, v_cache, block_tables, seq_lens) -> None:
    _check_cache(k_cache, v_cache)
    head_dim = kv_quant.head_dim_of(k_cache)
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(f"query must be [tokens, heads, {head_dim}], got {tuple(query.shape)}")
    _check_heads(query.shape[1], k_cache.shape[2])
    num_seqs = seq_lens.shape[0]
    if seq_lens.dim() != 1 or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be [num_seqs, "
                         f"max_blocks] for seq_lens {tuple(seq_lens.shape)}")


def _check_cache(k_cache, v_cache) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache "
                         f"{tuple(v_cache.shape)} {v_cache.dtype} must be equal 4-d tensors")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
