"""The C paged-attention kernel against the torch reference."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fleetlm.kernels import attention, cpu_attention, kv_quant

pytestmark = pytest.mark.skipif(not cpu_attention.is_available(),
                                reason="the C kernel did not compile here")

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
BLOCKS = pytest.mark.parametrize("block_size", [8, 16])
GROUPS = pytest.mark.parametrize("group", [1, 3])
# Decode reads a bf16 / int8 cache's rows as they are for up to 4 query heads per kv head
# (one row group), through copies for more: both, and every count of rows in a group.
DECODE_GROUPS = pytest.mark.parametrize("group", [1, 2, 3, 4, 5])
DECODE_SEQ_LENS = [1, 8, 17, 33, 16, 70]
PREFILL_CASES = {  # name: (q_lens, seq_lens)
    "fresh_prompts": ([5, 16, 9], [5, 16, 9]),
    "chunks_with_context": ([7, 3, 1, 40], [20, 40, 9, 73]),
}


@DTYPES
@BLOCKS
@DECODE_GROUPS
def test_decode_matches_reference(group, block_size, dtype, paged_batch, close):
    batch = paged_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, group=group,
                        block_size=block_size, dtype=dtype)
    out = cpu_attention.paged_decode_attention(*batch.decode_args())
    assert out.dtype == dtype
    close(out, attention.paged_decode_attention_reference(*batch.decode_args()), dtype)


# Fewer sequences than threads: each sequence's kv tokens are split into spans (from 256
# tokens and 2,304 (sequence, kv token, query head) triples: with these 2 kv heads, 2 or 6
# query heads, from 1,152 tokens for one sequence), one task each, merged at the end.
# (threads, seq_lens): one sequence split in two; three sequences over four threads, the
# shorter two too short for a second span (they merge an empty one); and a context short
# enough for one thread.
SPAN_CASES = {"one_long": (2, [1200]), "three_of_four_threads": (4, [1200, 300, 5]),
              "short": (2, [40])}


@contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("group", [1, 3, 8])  # 8: query rows in lanes, never split
@pytest.mark.parametrize("case", SPAN_CASES)
def test_decode_split_into_spans_matches_reference(case, group, dtype, paged_batch, close):
    num_threads, seq_lens = SPAN_CASES[case]
    batch = paged_batch([1] * len(seq_lens), seq_lens, group=group, block_size=16,
                        dtype=torch.float32 if dtype == torch.int8 else dtype)
    if dtype == torch.int8:
        batch.k_cache, batch.v_cache = (kv_quant.quantize_rows(cache)
                                        for cache in (batch.k_cache, batch.v_cache))
    with torch_threads(1):
        one = cpu_attention.paged_decode_attention(*batch.decode_args())
    with torch_threads(num_threads):
        split = cpu_attention.paged_decode_attention(*batch.decode_args())
    expected = attention.paged_decode_attention_reference(*batch.decode_args())
    close(split, expected, torch.float32 if dtype == torch.int8 else dtype)
    close(split, one, torch.float32 if dtype == torch.int8 else dtype)


@DTYPES
@BLOCKS
@GROUPS
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_reference(case, group, block_size, dtype, paged_batch, close):
    batch = paged_batch(*PREFILL_CASES[case], group=group, block_size=block_size, dtype=dtype)
    out = cpu_attention.paged_prefill_attention(*batch.prefill_args())
    close(out, attention.paged_prefill_attention_reference(*batch.prefill_args()), dtype)


def test_large_logits_keep_the_softmax_stable(paged_batch, close):
    """Scores of several hundred force many running-max rescales; nothing may overflow."""
    batch = paged_batch([1, 1], [100, 37], group=3, block_size=16, dtype=torch.float32)
    batch.scale = 20.0
    out = cpu_attention.paged_decode_attention(*batch.decode_args())
    assert torch.isfinite(out).all()
    close(out, attention.paged_decode_attention_reference(*batch.decode_args()), torch.float32)


@GROUPS
def test_prefill_rows_keep_the_softmax_stable(group, paged_batch):
    """Many rows of a prefill tile share each kv token (rows in vector lanes); with scores of
    several hundred most probabilities are tiny, and their products with values denormal.
    An fp32 score of ~1000 is only good to ~1e-4, and so is its exponential."""
    batch = paged_batch([40, 17], [100, 17], group=group, block_size=16, dtype=torch.float32)
    batch.scale = 20.0
    out = cpu_attention.paged_prefill_attention(*batch.prefill_args())
    assert torch.isfinite(out).all()
    expected = attention.paged_prefill_attention_reference(*batch.prefill_args())
    torch.testing.assert_close(out.double(), expected.double(), atol=1e-3, rtol=1e-3)


def test_fp32_query_over_bf16_cache(paged_batch, close):
    batch = paged_batch([1] * 3, [5, 40, 17], group=3, block_size=16, dtype=torch.bfloat16)
    batch.query = batch.query.float()
    out = cpu_attention.paged_decode_attention(*batch.decode_args())
    assert out.dtype == torch.float32
    close(out, attention.paged_decode_attention_reference(*batch.decode_args()), torch.bfloat16)


def test_thread_count_does_not_change_results(paged_batch):
    batch = paged_batch([7, 3, 1, 40], [20, 40, 9, 73], group=3, block_size=16,
                        dtype=torch.float32)
    with torch_threads(1):
        one = cpu_attention.paged_prefill_attention(*batch.prefill_args())
    with torch_threads(2):
        two = cpu_attention.paged_prefill_attention(*batch.prefill_args())
    assert torch.equal(one, two)


def test_block_ids_outside_the_cache_are_rejected(paged_batch):
    batch = paged_batch([1, 1], [5, 9], group=1, block_size=8, dtype=torch.float32)
    batch.block_tables[1, 1] = batch.k_cache.shape[0]
    with pytest.raises(ValueError, match="block"):
        cpu_attention.paged_decode_attention(*batch.decode_args())


def test_block_table_too_short_for_seq_len_is_rejected(paged_batch):
    batch = paged_batch([1], [9], group=1, block_size=8, dtype=torch.float32)
    batch.block_tables = batch.block_tables[:, :1]
    with pytest.raises(ValueError, match="too short"):
        cpu_attention.paged_decode_attention(*batch.decode_args())


def test_supports_only_what_the_kernel_handles():
    query = torch.zeros(2, 4, 64)
    cache = torch.zeros(3, 8, 2, 64)
    assert cpu_attention.supports(query, cache, cache)
    assert not cpu_attention.supports(query, cache.half(), cache.half())
    odd_dim = torch.zeros(3, 8, 2, 72)
    assert not cpu_attention.supports(query, odd_dim, odd_dim)


def test_strided_caches_are_rejected(paged_batch):
    batch = paged_batch([1], [9], group=1, block_size=8, dtype=torch.float32)
    batch.k_cache = batch.k_cache.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_attention.paged_decode_attention(*batch.decode_args())


@DTYPES
@GROUPS
def test_prefill_without_cache_matches_reference(group, dtype, paged_batch, close):
    """Fresh key/value as slices of a fused projection (strided tokens), no cache at all."""
    q_lens = [5, 16, 1, 40]
    batch = paged_batch(q_lens, q_lens, group=group, block_size=16, dtype=dtype)
    fused = torch.stack([torch.cat(batch.keys), torch.cat(batch.values)], dim=1)
    key, value = fused[:, 0], fused[:, 1]
    out = cpu_attention.prefill_attention_no_cache(batch.query, key, value, batch.cu_seqlens_q,
                                                   batch.scale)
    expected = attention.prefill_attention_no_cache_reference(
        batch.query, key, value, batch.cu_seqlens_q, batch.scale)
    close(out, expected, dtype)


_LIST_OPENMP_RUNTIMES = """
import os, torch
from fleetlm.kernels import cpu_attention
assert cpu_attention.is_available()
with open("/proc/self/maps", encoding="utf-8") as maps:
    print(sorted({os.path.realpath(line.split()[-1]) for line in maps
                  if "libgomp" in line or "libiomp" in line}))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_kernel_shares_torchs_openmp_runtime():
    """Two OpenMP runtimes in one process would oversubscribe the cores. Checked in a fresh
    process: other libraries (sentencepiece) may bring their own runtime into this one."""
    out = subprocess.run([sys.executable, "-c", _LIST_OPENMP_RUNTIMES], capture_output=True,
                         text=True, check=True).stdout
    runtimes = ast.literal_eval(out)
    assert len(runtimes) == 1 and "torch" in runtimes[0]
