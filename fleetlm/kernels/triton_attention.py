"""Triton kernels for the paged KV cache on CUDA: cache writes, decode and prefill attention.

Same contracts as `attention.py` (which validates arguments and dispatches here for CUDA
tensors). Softmax runs online in fp32; fp32 inputs use exact (IEEE) dot products, not TF32.
Every program gathers its own kv tokens through the block table, one token per lane, so any
block size works and tiles may span blocks.

An fp8 cache (`kv_cache_dtype: fp8`, float8 e4m3, as vLLM's without calibrated scales: a
scale of 1) is written by casting each K/V value, clamped to +-448, and read by casting back
to the query's dtype before the dot products: half the bytes of bf16 per token.

Tests run these through `TRITON_INTERPRET=1` on CPU tensors (fp32/fp16 only: the interpreter
gets `tl.dot` on bf16 wrong) and on a GPU against the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_DOT_SIZE = 16  # tl.dot needs every dimension >= 16
DECODE_BLOCK_N = 32  # kv tokens per decode step
PREFILL_BLOCK_M = 32  # query tokens per prefill program
PREFILL_BLOCK_N = 32  # kv tokens per prefill step
FP8 = torch.float8_e4m3fn  # the float8 cache dtype (kv_cache_dtype fp8)
FP8_MAX = float(torch.finfo(FP8).max)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_key, stride_value, ROW: tl.constexpr, BLOCK: tl.constexpr,
                     CLAMP: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        key = tl.load(key_ptr + token * stride_key + offs, mask=mask)
        value = tl.load(value_ptr + token * stride_value + offs, mask=mask)
        if CLAMP > 0:  # a float8 cache: saturate instead of overflowing to NaN
            key = tl.minimum(tl.maximum(key.to(tl.float32), -CLAMP), CLAMP)
            value = tl.minimum(tl.maximum(value.to(tl.float32), -CLAMP), CLAMP)
        tl.store(k_cache_ptr + slot * ROW + offs, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, value.to(v_cache_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, start,
                 kv_end, q_pos, scale, ROW_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    """One online-softmax step of query rows q [R, BLOCK_D] (at kv positions q_pos [R]) over
    kv tokens [start, start + BLOCK_N), masked to < kv_end and causally. A float8 cache's
    K and V are cast to q's dtype first."""
    pos = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    is_valid = pos < kv_end
    block = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=is_valid, other=0).to(tl.int64)
    rows = (block * BLOCK_SIZE + pos % BLOCK_SIZE) * ROW_STRIDE + kv_head * HEAD_DIM
    kv_mask = is_valid[:, None] & (dims[None, :] < HEAD_DIM)
    k = tl.load(k_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    if KV_FP8:
        k = k.to(q.dtype)
    s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION) * scale
    is_visible = is_valid[None, :] & (pos[None, :] <= q_pos[:, None])
    s = tl.where(is_visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # Rows that see nothing yet keep m = -inf; subtracting 0 keeps their exps at 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    v = tl.load(v_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _paged_decode_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                         seq_lens_ptr, scale, stride_bt, GROUP: tl.constexpr,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    """Program (seq, kv_head): the GROUP query heads of one kv head, so K/V are read once."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    q_offs = (seq * NUM_HEADS + kv_head * GROUP + g)[:, None] * HEAD_DIM + dims[None, :]
    q_mask = (g < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + seq_len - 1
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr,
                                 block_tables_ptr + seq * stride_bt, kv_head, start, seq_len,
                                 q_pos, scale, NUM_KV_HEADS * HEAD_DIM, HEAD_DIM, BLOCK_D,
                                 BLOCK_SIZE, BLOCK_N, DOT_PRECISION, KV_FP8)
    out = acc / l[:, None]
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _paged_prefill_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_q_ptr,
                          seq_lens_ptr, block_tables_ptr, scale, stride_bt,
                          GROUP: tl.constexpr, NUM_HEADS: tl.constexpr,
                          NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    """Program (query tile, seq, head): BLOCK_M query tokens of one head of one sequence."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_begin
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - q_len
        i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q_offs = ((q_begin + i) * NUM_HEADS + head)[:, None] * HEAD_DIM + dims[None, :]
        q_mask = (i < q_len)[:, None] & (dims < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kv_end = tl.minimum(seq_len, context + (tile + 1) * BLOCK_M)
        for start in range(0, kv_end, BLOCK_N):
            m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr,
                                     block_tables_ptr + seq * stride_bt, head // GROUP, start,
                                     kv_end, context + i, scale, NUM_KV_HEADS * HEAD_DIM,
                                     HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, DOT_PRECISION,
                                     KV_FP8)
        out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """`attention.write_kv_cache` on CUDA (slots < 0 are skipped)."""
    key, value = _rows_contiguous(key), _rows_contiguous(value)
    num_tokens, num_kv_heads, head_dim = key.shape
    row = num_kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](key, value, k_cache, v_cache, slot_mapping, key.stride(0),
                                    value.stride(0), ROW=row, BLOCK=triton.next_power_of_2(row),
                                    CLAMP=FP8_MAX if k_cache.dtype == FP8 else 0.0)


def paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale):
    """`attention.paged_decode_attention` on CUDA."""
    query = query.contiguous()
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, group = k_cache.shape[2], num_heads // k_cache.shape[2]
    out = torch.empty_like(query)
    block_tables = block_tables.contiguous()
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        out, query, k_cache, v_cache, block_tables, seq_lens.contiguous(), scale,
        block_tables.stride(0), GROUP=group, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_G=max(MIN_DOT_SIZE, triton.next_power_of_2(group)),
        BLOCK_D=max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=DECODE_BLOCK_N,
        DOT_PRECISION=dot_precision(k_cache.dtype), KV_FP8=k_cache.dtype == FP8)
    return out


def paged_prefill_attention(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
                            scale, max_seqlen_q: int | None = None):
    """`attention.paged_prefill_attention` on CUDA; `max_seqlen_q` spares a device sync."""
    query = query.contiguous()
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    out = torch.empty_like(query)
    block_tables = block_tables.contiguous()
    grid = (triton.cdiv(max_seqlen_q, PREFILL_BLOCK_M), seq_lens.shape[0], num_heads)
    _paged_prefill_kernel[grid](
        out, query, k_cache, v_cache, cu_seqlens_q.contiguous(), seq_lens.contiguous(),
        block_tables, scale, block_tables.stride(0), GROUP=num_heads // num_kv_heads,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N,
        DOT_PRECISION=dot_precision(k_cache.dtype), KV_FP8=k_cache.dtype == FP8)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """Exact products for fp32 caches; TF32 would round their inputs to 10 mantissa bits."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """Each token's [num_kv_heads, head_dim] contiguous (token stride may be anything)."""
    num_kv_heads, head_dim = tensor.shape[1:]
    if tensor.stride(2) == 1 and tensor.stride(1) == head_dim:
        return tensor
    return tensor.contiguous()
