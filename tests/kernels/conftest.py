"""Shared builders for the kernel tests: a random paged batch and an independent dense check."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fleetlm.kernels.attention import write_kv_cache_reference

HEAD_DIM = 64
NUM_KV_HEADS = 2
NUM_SPARE_BLOCKS = 3  # blocks no sequence owns, filled with noise
TOLERANCES = {  # (atol, rtol) for outputs in each dtype
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    keys: list[torch.Tensor]  # per sequence, [seq_len, num_kv_heads, head_dim] in cache dtype
    values: list[torch.Tensor]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    scale: float

    def decode_args(self):
        return (self.query, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.scale)

    def prefill_args(self):
        return (self.query, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens,
                self.block_tables, self.scale)


def build_paged_batch(q_lens, seq_lens, *, group, block_size, dtype, seed=0,
                      head_dim=HEAD_DIM, num_kv_heads=NUM_KV_HEADS, device="cpu") -> PagedBatch:
    """Random sequences written into a shuffled paged cache; block table rows are padded with
    an out-of-range block id, which kernels must never read."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + NUM_SPARE_BLOCKS
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), num_blocks + 7,
                              dtype=torch.int32)
    keys, values = [], []
    for seq, (kv_len, num_used) in enumerate(zip(seq_lens, blocks_per_seq)):
        block_tables[seq, :num_used] = torch.tensor(physical[:num_used], dtype=torch.int32)
        physical = physical[num_used:]
        key = torch.randn(kv_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        value = torch.randn(kv_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        positions = torch.arange(kv_len)
        slots = block_tables[seq, positions // block_size].long() * block_size
        write_kv_cache_reference(key, value, k_cache, v_cache, slots + positions % block_size)
        keys.append(key)
        values.append(value)
    num_heads = num_kv_heads * group
    query = 2 * torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    cu_seqlens_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu_seqlens_q[1:] = torch.tensor(q_lens).cumsum(0)
    batch = PagedBatch(query.to(dtype), keys, values, k_cache, v_cache, block_tables,
                       torch.tensor(seq_lens, dtype=torch.int32), cu_seqlens_q, head_dim**-0.5)
    if device != "cpu":
        for name, tensor in vars(batch).items():
            if isinstance(tensor, torch.Tensor):
                setattr(batch, name, tensor.to(device))
    return batch


def dense_causal_attention(batch: PagedBatch) -> torch.Tensor:
    """Per sequence, plain softmax(q k^T) v in float64 from the dense keys/values, with the
    lower-right causal mask written out; returns float64 [num_tokens, num_heads, head_dim]."""
    group = batch.query.shape[1] // batch.keys[0].shape[1]
    bounds = batch.cu_seqlens_q.tolist()
    outputs = []
    for seq, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        query = batch.query[begin:end].double().cpu()
        key = batch.keys[seq].double().cpu().repeat_interleave(group, dim=1)
        value = batch.values[seq].double().cpu().repeat_interleave(group, dim=1)
        q_len, kv_len = end - begin, key.shape[0]
        scores = torch.einsum("qhd,khd->hqk", query, key) * batch.scale
        query_pos = kv_len - q_len + torch.arange(q_len)
        is_visible = torch.arange(kv_len)[None, :] <= query_pos[:, None]
        probs = scores.masked_fill(~is_visible, float("-inf")).softmax(dim=-1)
        outputs.append(torch.einsum("hqk,khd->qhd", probs, value))
    return torch.cat(outputs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol,
                               rtol=rtol)


@pytest.fixture
def paged_batch():
    return build_paged_batch


@pytest.fixture
def dense_attention():
    return dense_causal_attention


@pytest.fixture
def close():
    return assert_close
