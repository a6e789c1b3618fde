"""Time the CPU paged-attention paths: `python -m fleetlm.kernels.benchmark [--threads N]`.

Decode at a SmolLM2-135M-like shape (9 query heads over 3 kv heads, head_dim 64), torch
reference vs the C kernel, per layer, over fp32, bf16 and int8 caches (`kv_quant`): each call
reads a different layer's cache from a set larger than the L3 cache, as a real forward pass
does. Reports milliseconds (best and median)
and effective bandwidth: the K/V bytes a call must read over its time. Then the
torch/C-kernel interplay: a loop alternating torch matmuls with the kernel against the sum of
the two timed apart, with 1 thread (no thread hand-off possible) and N.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fleetlm.kernels import attention, cpu_attention, kv_quant

NUM_SEQS, KV_LEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 384, 9, 3, 64, 16
NUM_LAYERS = 6  # distinct caches cycled through, more bytes than the L3 cache holds
HIDDEN, INTERMEDIATE = 576, 1536


def _layer_caches(dtype: torch.dtype, kv_len: int):
    num_blocks = NUM_SEQS * (kv_len // BLOCK_SIZE)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    tables = torch.randperm(num_blocks, dtype=torch.int32).view(NUM_SEQS, -1)

    def cache():  # int8: kv_quant's rows, scales included
        values = torch.randn(shape)
        return kv_quant.quantize_rows(values) if dtype == torch.int8 else values.to(dtype)

    return [(cache(), cache(), tables) for _ in range(NUM_LAYERS)]


def _time_per_call(fn, layers, num_rounds: int) -> list[float]:
    for layer in layers:
        fn(*layer)
    times = []
    for _ in range(num_rounds):
        for layer in layers:
            start = time.perf_counter()
            fn(*layer)
            times.append(time.perf_counter() - start)
    return times


def bench_decode(dtype: torch.dtype) -> None:
    layers = _layer_caches(dtype, KV_LEN)
    query = torch.randn(NUM_SEQS, NUM_HEADS, HEAD_DIM).to(
        torch.float32 if dtype == torch.int8 else dtype)
    seq_lens = torch.full((NUM_SEQS,), KV_LEN, dtype=torch.int32)
    num_bytes = 2 * layers[0][0].numel() * layers[0][0].element_size()
    paths = {"reference": (attention.paged_decode_attention_reference, 3),
             "C kernel": (cpu_attention.paged_decode_attention, 30)}
    for name, (decode, num_rounds) in paths.items():
        times = _time_per_call(
            lambda k, v, tables: decode(query, k, v, tables, seq_lens, HEAD_DIM**-0.5), layers,
            num_rounds)
        best, median = min(times), statistics.median(times)
        print(f"decode {str(dtype):14s} {name:9s}: best {best * 1e3:7.3f} ms "
              f"({num_bytes / best / 1e9:5.1f} GB/s), median {median * 1e3:7.3f} ms")


def bench_interplay(num_threads: int) -> None:
    """Small shapes, so everything stays in cache and any excess is thread hand-off."""
    kv_len = 64
    [layer] = _layer_caches(torch.float32, kv_len)[:1]
    query = torch.randn(NUM_SEQS, NUM_HEADS, HEAD_DIM)
    seq_lens = torch.full((NUM_SEQS,), kv_len, dtype=torch.int32)
    x, w1, w2 = (torch.randn(NUM_SEQS, HIDDEN), torch.randn(HIDDEN, INTERMEDIATE),
                 torch.randn(INTERMEDIATE, HIDDEN))

    def matmuls():
        return torch.nn.functional.silu(x @ w1) @ w2

    def attend():
        return cpu_attention.paged_decode_attention(query, *layer, seq_lens, HEAD_DIM**-0.5)

    def both():
        matmuls()
        attend()

    for threads in sorted({1, num_threads}):
        torch.set_num_threads(threads)
        best = {fn.__name__: min(_time_per_call(lambda: fn(), [()], 300)) for fn in
                (matmuls, attend, both)}
        print(f"interplay, {threads} thread(s): matmuls {best['matmuls'] * 1e6:.0f} us + "
              f"kernel {best['attend'] * 1e6:.0f} us apart, alternating "
              f"{best['both'] * 1e6:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not cpu_attention.is_available():
        raise SystemExit("the C kernel did not compile; see the warning above")
    torch.set_num_threads(args.threads)
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        bench_decode(dtype)
    bench_interplay(args.threads)


if __name__ == "__main__":
    main()
