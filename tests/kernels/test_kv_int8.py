"""int8 KV cache (`kv_quant`): quantization bounds, the C write and the C attention kernel
against the torch references over the same quantized cache, and both against float KV."""

from __future__ import annotations

import pytest
import torch

from fleetlm.kernels import attention, cpu_attention, kv_quant

needs_c_kernel = pytest.mark.skipif(not cpu_attention.is_available(),
                                    reason="the C kernel did not compile here")
BLOCKS = pytest.mark.parametrize("block_size", [1, 8, 16])
GROUPS = pytest.mark.parametrize("group", [1, 3])
DECODE_GROUPS = pytest.mark.parametrize("group", [1, 2, 3, 4, 5])  # one row group, and more
DECODE_SEQ_LENS = [1, 8, 17, 33, 16, 70]
PREFILL_CASES = {  # name: (q_lens, seq_lens)
    "fresh_prompts": ([5, 16, 9], [5, 16, 9]),
    "chunks_with_context": ([7, 3, 1, 40], [20, 40, 9, 73]),
}
SAME_CACHE = {"atol": 2e-5, "rtol": 1e-5}  # C kernel vs reference on one int8 cache
# int8 vs float KV on this batch's N(0, 1) keys/values and N(0, 4) queries: each element is
# off by at most absmax / 254 (about 0.013 for an absmax near 3.3); measured worst output
# difference 0.041.
INT8_VS_FLOAT = {"atol": 0.06, "rtol": 0.0}


def quantized(batch):
    """The float batch with its caches (spare blocks' noise included) quantized to int8."""
    batch.k_cache, batch.v_cache = (kv_quant.quantize_rows(cache)
                                    for cache in (batch.k_cache, batch.v_cache))
    return batch


def test_round_trip_error_is_at_most_half_a_step():
    rows = torch.randn(64, 3, 64) * torch.logspace(-3, 3, 64)[:, None, None]
    rows[5, 1] = 0.0  # an all-zero row: scale 0, values 0
    packed = kv_quant.quantize_rows(rows)
    assert packed.dtype == torch.int8 and packed.shape == (64, 3, 68)
    values, scales = kv_quant.split_rows(packed)
    absmax = rows.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(scales, absmax / 127, atol=0, rtol=0)
    assert values.abs().max() <= 127 and (values.abs().amax(dim=-1) == 127).sum() == 64 * 3 - 1
    error = (kv_quant.dequantize_rows(packed) - rows).abs()
    assert bool((error <= scales / 2 * (1 + 1e-5)).all())
    assert float((error / absmax.clamp(min=1e-30)).max()) <= 0.5 / 127 + 1e-6
    assert not kv_quant.dequantize_rows(packed)[5, 1].any()


def test_layout_helpers():
    cache = torch.zeros(4, 16, 2, 68, dtype=torch.int8)
    assert kv_quant.head_dim_of(cache) == 64 and kv_quant.row_width(64, torch.int8) == 68
    assert kv_quant.head_dim_of(cache.float()) == 68 and kv_quant.row_width(64, torch.bfloat16) == 64


def test_reference_write_quantizes_into_the_slots():
    key, value = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    k_cache = torch.zeros(3, 4, 2, 68, dtype=torch.int8)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, -1, 11, 6])
    attention.write_kv_cache_reference(key, value, k_cache, v_cache, slots)
    for cache, source in ((k_cache, key), (v_cache, value)):
        rows = cache.view(-1, 2, 68)
        assert torch.equal(rows[[0, 5, 11, 6]], kv_quant.quantize_rows(source[[0, 1, 3, 4]]))
        assert not rows[[1, 2, 3, 4, 7, 8, 9, 10]].any()  # padding and unused slots untouched


@needs_c_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_c_write_equals_the_reference_write(dtype):
    """Bit for bit, from strided slices of a fused projection, padding slots skipped; enough
    rows that the write runs on several threads."""
    gen = torch.Generator().manual_seed(1)
    fused = (torch.randn(300, 3 * 2 * 64, generator=gen) * 3).to(dtype)
    key, value = fused[:, 128:256].view(300, 2, 64), fused[:, 256:].view(300, 2, 64)
    slots = torch.randperm(40 * 8, generator=gen)[:300]
    slots[::7] = -1
    caches = [torch.zeros(40, 8, 2, 68, dtype=torch.int8) for _ in range(4)]
    attention.write_kv_cache_reference(key, value, caches[0], caches[1], slots)
    assert cpu_attention.supports_write(key, caches[2])
    attention.write_kv_cache(key, value, caches[2], caches[3], slots)  # dispatches to C
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@needs_c_kernel
def test_c_write_rejects_a_slot_outside_the_cache():
    cache = torch.zeros(2, 4, 1, 68, dtype=torch.int8)
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_attention.write_kv_cache_int8(torch.ones(1, 1, 64), torch.ones(1, 1, 64), cache,
                                          cache.clone(), torch.tensor([8]))


@needs_c_kernel
@BLOCKS
@DECODE_GROUPS
def test_decode_over_int8_matches_the_reference_and_float(group, block_size, paged_batch):
    batch = paged_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, group=group,
                        block_size=block_size, dtype=torch.float32)
    float_out = cpu_attention.paged_decode_attention(*batch.decode_args())
    batch = quantized(batch)
    assert cpu_attention.supports(batch.query, batch.k_cache, batch.v_cache)
    out = attention.paged_decode_attention(*batch.decode_args())  # dispatches to C
    expected = attention.paged_decode_attention_reference(*batch.decode_args())
    torch.testing.assert_close(out, expected, **SAME_CACHE)
    torch.testing.assert_close(out, float_out, **INT8_VS_FLOAT)


@needs_c_kernel
@BLOCKS
@GROUPS
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_over_int8_matches_the_reference_and_float(case, group, block_size,
                                                            paged_batch):
    batch = paged_batch(*PREFILL_CASES[case], group=group, block_size=block_size,
                        dtype=torch.float32)
    float_out = cpu_attention.paged_prefill_attention(*batch.prefill_args())
    batch = quantized(batch)
    out = attention.paged_prefill_attention(*batch.prefill_args())
    expected = attention.paged_prefill_attention_reference(*batch.prefill_args())
    torch.testing.assert_close(out, expected, **SAME_CACHE)
    torch.testing.assert_close(out, float_out, **INT8_VS_FLOAT)


@needs_c_kernel
def test_bf16_query_over_an_int8_cache(paged_batch):
    batch = quantized(paged_batch([1] * 3, [5, 40, 17], group=3, block_size=16,
                                  dtype=torch.float32))
    batch.query = batch.query.bfloat16()
    out = cpu_attention.paged_decode_attention(*batch.decode_args())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out, attention.paged_decode_attention_reference(*batch.decode_args()),
        atol=2e-2, rtol=2e-2)

