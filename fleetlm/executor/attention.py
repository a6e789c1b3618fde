"""The attention layer over the paged KV cache and the per-step metadata it reads.

Batch layout (the model runner's "region map" of one step's tokens):
    [ decode tokens: one per single-token request | prefill tokens: several per request ]
Decode requests come first so the decode kernel reads one contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fleetlm.kernels import attention as kernels
from fleetlm.kernels.kv_quant import is_rounded


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each token's K/V is written
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decodes] int32, kv length incl. the new token
    num_prefill_tokens: int
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefills + 1] int32, offsets into prefill tokens
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32, kv length incl. this chunk
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    is_prefill_without_context: bool  # every prefill chunk starts at position 0


class PagedAttention(nn.Module):
    """Writes this step's K/V into the cache, then attends over each request's blocks.

    Prompts without earlier context attend over their fresh K/V, except over an int8 or fp8
    cache: there every token reads the rounded KV, so a request's output does not depend on
    how its prompt was split (chunks, prefix-cache hits, KV from a prefill engine), as vLLM's
    attention over an fp8 cache does."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(self, q, k, v, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        kernels.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        num_decode = meta.num_decode_tokens
        if meta.num_prefill_tokens == 0:
            return kernels.paged_decode_attention(
                q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, self.scale)
        out = torch.empty_like(q)
        if num_decode:
            out[:num_decode] = kernels.paged_decode_attention(
                q[:num_decode], k_cache, v_cache, meta.decode_block_tables,
                meta.decode_seq_lens, self.scale)
        if meta.is_prefill_without_context and not is_rounded(k_cache):
            out[num_decode:] = kernels.prefill_attention_no_cache(
                q[num_decode:], k[num_decode:], v[num_decode:], meta.prefill_cu_seqlens_q,
                self.scale)
        else:
            out[num_decode:] = kernels.paged_prefill_attention(
                q[num_decode:], k_cache, v_cache, meta.prefill_cu_seqlens_q,
                meta.prefill_seq_lens, meta.prefill_block_tables, self.scale)
        return out
