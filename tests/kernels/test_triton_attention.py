"""Triton kernels: through the interpreter on CPU (in a subprocess), and on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fleetlm.kernels import attention

INTERPRETER_CASES = Path(__file__).with_name("triton_interpreter_cases.py")
INTERPRETER_TIMEOUT_S = 300
GPU_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                                     ids=str)
GPU_GROUPS = pytest.mark.parametrize("group", [1, 4])


def test_kernels_match_reference_under_the_interpreter():
    """`TRITON_INTERPRET=1` is process-wide, so the interpreted cases get a process of their
    own (see triton_interpreter_cases.py)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INTERPRETER_CASES)],
        cwd=INTERPRETER_CASES.parents[2], env=env, capture_output=True, text=True,
        timeout=INTERPRETER_TIMEOUT_S)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert " passed" in report and "failed" not in report and "skipped" not in report, report


@pytest.mark.gpu
@GPU_DTYPES
@GPU_GROUPS
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_decode_matches_reference(block_size, group, dtype, paged_batch, close):
    seq_lens = [1, 15, 16, 17, 300, 1000, 2049] * 4
    batch = paged_batch([1] * len(seq_lens), seq_lens, group=group, block_size=block_size,
                        dtype=dtype, head_dim=128, num_kv_heads=8, device="cuda")
    out = attention.paged_decode_attention(*batch.decode_args())
    close(out, attention.paged_decode_attention_reference(*batch.decode_args()), dtype)


@pytest.mark.gpu
@GPU_DTYPES
@GPU_GROUPS
def test_gpu_prefill_matches_reference(group, dtype, paged_batch, close):
    q_lens, seq_lens = [1, 77, 512, 200, 33], [1, 77, 700, 1200, 40]
    batch = paged_batch(q_lens, seq_lens, group=group, block_size=16, dtype=dtype,
                        head_dim=128, num_kv_heads=8, device="cuda")
    out = attention.paged_prefill_attention(*batch.prefill_args())
    close(out, attention.paged_prefill_attention_reference(*batch.prefill_args()), dtype)


@pytest.mark.gpu
def test_gpu_write_kv_cache_matches_reference():
    k_cache = torch.zeros(64, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(300, 8, 128, device="cuda")
    value = torch.randn(300, 8, 128, device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1
    attention.write_kv_cache(key, value, k_cache, v_cache, slots)
    k_expected, v_expected = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    attention.write_kv_cache_reference(key, value, k_expected, v_expected, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def _as_fp8(cache: torch.Tensor) -> torch.Tensor:
    return cache.float().clamp(-448, 448).to(torch.float8_e4m3fn)


@pytest.mark.gpu
@GPU_GROUPS
def test_gpu_fp8_cache_attention_matches_reference_on_its_values(group, paged_batch, close):
    """kv_cache_dtype fp8: the kernels cast the float8 cache to the query's dtype on read; the
    reference runs on the same values held in bf16."""
    seq_lens = [1, 17, 300, 2049]
    batch = paged_batch([1] * len(seq_lens), seq_lens, group=group, block_size=16,
                        dtype=torch.bfloat16, head_dim=128, num_kv_heads=8, device="cuda")
    k8, v8 = _as_fp8(batch.k_cache), _as_fp8(batch.v_cache)
    args = (batch.query, k8, v8, batch.block_tables, batch.seq_lens, batch.scale)
    expected = attention.paged_decode_attention_reference(
        batch.query, k8.bfloat16(), v8.bfloat16(), batch.block_tables, batch.seq_lens,
        batch.scale)
    close(attention.paged_decode_attention(*args), expected, torch.bfloat16)
    prefill = paged_batch([1, 77, 200], [1, 700, 200], group=group, block_size=16,
                          dtype=torch.bfloat16, head_dim=128, num_kv_heads=8, device="cuda")
    k8, v8 = _as_fp8(prefill.k_cache), _as_fp8(prefill.v_cache)
    rest = (prefill.cu_seqlens_q, prefill.seq_lens, prefill.block_tables, prefill.scale)
    close(attention.paged_prefill_attention(prefill.query, k8, v8, *rest),
          attention.paged_prefill_attention_reference(prefill.query, k8.bfloat16(),
                                                      v8.bfloat16(), *rest), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_write_into_an_fp8_cache_casts_and_saturates():
    k_cache = torch.zeros(64, 16, 8, 128, dtype=torch.float8_e4m3fn, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16) * 50
    value = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    key[0, 0, :2] = torch.tensor([1000.0, -1e5])  # beyond e4m3's 448: saturated, not NaN
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    attention.write_kv_cache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 8, 128), v_cache.view(-1, 8, 128)
    assert torch.equal(flat_k[slots].view(torch.uint8), _as_fp8(key).view(torch.uint8))
    assert torch.equal(flat_v[slots].view(torch.uint8), _as_fp8(value).view(torch.uint8))
    assert flat_k[slots[0], 0, :2].float().tolist() == [448.0, -448.0]
