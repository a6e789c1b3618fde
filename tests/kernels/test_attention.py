"""The torch references and the CPU dispatch against a dense causal attention written here."""

from __future__ import annotations

import pytest
import torch

from fleetlm.kernels import attention

DTYPES = [torch.float32, torch.bfloat16]
DECODE_SEQ_LENS = [1, 8, 17, 33, 16, 40]  # one token, whole blocks, partial last blocks
PREFILL_CASES = {  # name: (q_lens, seq_lens)
    "fresh_prompts": ([5, 16, 9], [5, 16, 9]),
    "chunks_with_context": ([7, 3, 1, 20, 1], [20, 40, 9, 33, 1]),
}
GRID = pytest.mark.parametrize("dtype", DTYPES, ids=str)
BLOCKS = pytest.mark.parametrize("block_size", [8, 16])
GROUPS = pytest.mark.parametrize("group", [1, 3])


@GRID
@BLOCKS
@GROUPS
@pytest.mark.parametrize("decode_fn", [attention.paged_decode_attention_reference,
                                       attention.paged_decode_attention], ids=["reference",
                                                                               "dispatch"])
def test_decode_matches_dense(decode_fn, group, block_size, dtype, paged_batch, dense_attention,
                              close):
    batch = paged_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, group=group,
                        block_size=block_size, dtype=dtype)
    out = decode_fn(*batch.decode_args())
    assert out.shape == batch.query.shape and out.dtype == dtype
    close(out, dense_attention(batch), dtype)


@GRID
@BLOCKS
@GROUPS
@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("prefill_fn", [attention.paged_prefill_attention_reference,
                                        attention.paged_prefill_attention],
                         ids=["reference", "dispatch"])
def test_prefill_matches_dense(prefill_fn, case, group, block_size, dtype, paged_batch,
                               dense_attention, close):
    q_lens, seq_lens = PREFILL_CASES[case]
    batch = paged_batch(q_lens, seq_lens, group=group, block_size=block_size, dtype=dtype)
    out = prefill_fn(*batch.prefill_args())
    assert out.shape == batch.query.shape and out.dtype == dtype
    close(out, dense_attention(batch), dtype)


@GRID
@GROUPS
@pytest.mark.parametrize("no_cache_fn", [attention.prefill_attention_no_cache_reference,
                                         attention.prefill_attention_no_cache],
                         ids=["reference", "dispatch"])
def test_prefill_without_cache_matches_dense(no_cache_fn, group, dtype, paged_batch,
                                             dense_attention, close):
    q_lens = [5, 16, 1, 9]
    batch = paged_batch(q_lens, q_lens, group=group, block_size=16, dtype=dtype)
    out = no_cache_fn(batch.query, torch.cat(batch.keys), torch.cat(batch.values),
                      batch.cu_seqlens_q, batch.scale)
    close(out, dense_attention(batch), dtype)


def test_decode_is_the_last_row_of_prefill(paged_batch):
    seq_lens = [9, 30, 17]
    batch = paged_batch(seq_lens, seq_lens, group=3, block_size=8, dtype=torch.float32)
    last_rows = batch.cu_seqlens_q[1:].long() - 1
    prefill = attention.paged_prefill_attention(*batch.prefill_args())
    decode = attention.paged_decode_attention(batch.query[last_rows], batch.k_cache,
                                              batch.v_cache, batch.block_tables,
                                              batch.seq_lens, batch.scale)
    torch.testing.assert_close(decode, prefill[last_rows], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_write_kv_cache_places_tokens_at_their_slots(dtype):
    block_size, num_kv_heads, head_dim = 4, 2, 8
    k_cache = torch.zeros(5, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(6, num_kv_heads, head_dim)
    value = torch.randn(6, num_kv_heads, head_dim)
    slots = torch.tensor([0, 3, 4, 19, -1, 9])  # -1: a padding token, never written
    attention.write_kv_cache(key, value, k_cache, v_cache, slots)
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        assert torch.equal(k_cache[block, offset], key[token].to(dtype))
        assert torch.equal(v_cache[block, offset], value[token].to(dtype))
    num_written = k_cache.flatten(0, 1).abs().sum(dim=(1, 2)).count_nonzero()
    assert num_written == 5


def test_write_kv_cache_rejects_mismatched_shapes():
    k_cache = torch.zeros(2, 4, 2, 8)
    key = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match="slot_mapping"):
        attention.write_kv_cache(key, key, k_cache, k_cache.clone(), torch.zeros(2).long())
    with pytest.raises(ValueError, match="key"):
        attention.write_kv_cache(key[:, :1], key[:, :1], k_cache, k_cache.clone(),
                                 torch.zeros(3).long())


def test_decode_rejects_bad_arguments(paged_batch):
    batch = paged_batch([1, 1], [5, 9], group=3, block_size=8, dtype=torch.float32)
    query, k_cache, v_cache, block_tables, seq_lens, scale = batch.decode_args()
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attention.paged_decode_attention(query[:, :5], k_cache, v_cache, block_tables,
                                         seq_lens, scale)
    with pytest.raises(ValueError, match="must be equal"):
        attention.paged_decode_attention(query, k_cache, v_cache[:-1], block_tables, seq_lens,
                                         scale)
    with pytest.raises(ValueError, match="contiguous"):
        strided = k_cache.transpose(0, 1).contiguous().transpose(0, 1)
        attention.paged_decode_attention(query, strided, strided, block_tables, seq_lens,
                                         scale)
    with pytest.raises(ValueError, match="block_tables"):
        attention.paged_decode_attention(query, k_cache, v_cache, block_tables[:1], seq_lens,
                                         scale)
    with pytest.raises(ValueError, match="one query token per sequence"):
        attention.paged_decode_attention(query[:1], k_cache, v_cache, block_tables, seq_lens,
                                         scale)


@pytest.mark.parametrize("prefill_fn", [attention.paged_prefill_attention_reference,
                                        attention.paged_prefill_attention],
                         ids=["reference", "dispatch"])
def test_prefill_rejects_kv_shorter_than_query(prefill_fn, paged_batch):
    batch = paged_batch([4, 2], [4, 6], group=1, block_size=8, dtype=torch.float32)
    batch.seq_lens[0] = 3
    with pytest.raises(ValueError, match="seq_len"):
        prefill_fn(*batch.prefill_args())


def test_prefill_rejects_bad_cu_seqlens(paged_batch):
    batch = paged_batch([4, 2], [4, 6], group=1, block_size=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attention.paged_prefill_attention(batch.query, batch.k_cache, batch.v_cache,
                                          batch.cu_seqlens_q[:-1], batch.seq_lens,
                                          batch.block_tables, batch.scale)


def test_dispatch_falls_back_to_the_reference_without_the_c_kernel(paged_batch, monkeypatch):
    batch = paged_batch([1, 1], [5, 30], group=3, block_size=8, dtype=torch.float32)
    monkeypatch.setattr(attention.cpu_attention, "is_available", lambda: False)
    out = attention.paged_decode_attention(*batch.decode_args())
    expected = attention.paged_decode_attention_reference(*batch.decode_args())
    assert torch.equal(out, expected)
