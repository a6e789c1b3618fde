"""Two or more versions of the CPU paged-attention kernel (`paged_attention.c`), alternated in
one process on the built-in model's attention shapes (9 query heads over 3 kv heads of 64
dimensions, an int8 KV cache in blocks of 16 tokens at random places):

- a prefill: `--prefill-seqs` fresh prompts of `--prefill-len` tokens (one layer's call);
- a decode step: `--decode-seqs` sequences of `--decode-len` tokens of context, one query
  token each (one layer's call, as the decode stack makes it).

kernel_ab.py times the same kernels inside whole prefills and decode steps; this times the
attention alone, a call of each version in turn, and checks that every version's output is
bit-equal to the first's.

    mkdir -p /tmp/old && git archive OLD fleetlm/kernels/csrc | tar -x -C /tmp/old
    flock -x /tmp/fleetlm-cpu.lock .venv/bin/python benchmarks/attention_ab.py \\
        before=/tmp/old/fleetlm/kernels/csrc after=fleetlm/kernels/csrc
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fleetlm.bench.machine import cpu_name
from fleetlm.kernels import cpu_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16  # SmolLM2-135M's attention


def load_version(csrc: Path):
    """The paged_attention library built from the sources in `csrc`."""
    source = cpu_attention.SOURCE
    try:
        cpu_attention.SOURCE = csrc / source.name
        return cpu_attention._library.__wrapped__()
    finally:
        cpu_attention.SOURCE = source


def int8_cache(num_seqs: int, length: int, generator: torch.Generator):
    """(k_cache, v_cache, block_tables) holding random K/V for num_seqs sequences of `length`
    tokens, their blocks shuffled through the cache."""
    num_blocks = num_seqs * -(-length // BLOCK_SIZE)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM + 4)  # int8 rows, then a scale
    k_cache, v_cache = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
    block_tables = torch.randperm(num_blocks, generator=generator).view(num_seqs, -1)
    slots = (block_tables[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE))
    slots = slots.reshape(num_seqs, -1)[:, :length].reshape(-1)
    key = torch.randn(slots.numel(), NUM_KV_HEADS, HEAD_DIM, generator=generator)
    value = torch.randn(slots.numel(), NUM_KV_HEADS, HEAD_DIM, generator=generator)
    cpu_attention.write_kv_cache_int8(key, value, k_cache, v_cache, slots)
    return k_cache, v_cache, block_tables.to(torch.int32)


def alternate(libraries: dict, call, repeats: int) -> dict[str, float]:
    """Median ms of `call()` per version, the versions in turn; asserts equal outputs."""
    times = {name: [] for name in libraries}
    outputs = {}
    for _ in range(repeats):
        for name, library in libraries.items():
            cpu_attention._library = lambda library=library: library
            started = time.perf_counter()
            outputs[name] = call()
            times[name].append((time.perf_counter() - started) * 1e3)
    first = next(iter(outputs.values()))
    for name, output in outputs.items():
        if not torch.equal(output, first):
            raise SystemExit(f"{name}'s output differs from the first version's")
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="NAME=CSRC_DIR, two or more")
    parser.add_argument("--prefill-seqs", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--decode-seqs", type=int, default=32)
    parser.add_argument("--decode-len", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    versions = dict(v.split("=", 1) for v in args.versions)
    libraries = {name: load_version(Path(csrc)) for name, csrc in versions.items()}
    if None in libraries.values():
        raise SystemExit("a version's kernel did not build (no C compiler?)")
    generator = torch.Generator().manual_seed(0)
    scale = HEAD_DIM ** -0.5
    results = {"cpu": cpu_name(), "versions": versions, "threads": torch.get_num_threads()}

    seqs, length = args.prefill_seqs, args.prefill_len
    k_cache, v_cache, block_tables = int8_cache(seqs, length, generator)
    query = torch.randn(seqs * length, NUM_HEADS, HEAD_DIM, generator=generator)
    cu_seqlens = torch.arange(0, seqs * length + 1, length, dtype=torch.int32)
    seq_lens = torch.full((seqs,), length, dtype=torch.int32)
    results["prefill_ms"] = alternate(libraries, lambda: cpu_attention.paged_prefill_attention(
        query, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, scale), args.repeats)
    print(f"prefill, {seqs} x {length} tokens: " + "  ".join(
        f"{name} {ms:.2f} ms" for name, ms in results["prefill_ms"].items()), flush=True)

    seqs, length = args.decode_seqs, args.decode_len
    k_cache, v_cache, block_tables = int8_cache(seqs, length, generator)
    query = torch.randn(seqs, NUM_HEADS, HEAD_DIM, generator=generator)
    seq_lens = torch.full((seqs,), length, dtype=torch.int32)
    results["decode_ms"] = alternate(libraries, lambda: cpu_attention.paged_decode_attention(
        query, k_cache, v_cache, block_tables, seq_lens, scale), args.repeats)
    print(f"decode, {seqs} sequences of {length} tokens: " + "  ".join(
        f"{name} {ms:.3f} ms" for name, ms in results["decode_ms"].items()), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
