"""KV-cache dtype: blocks per memory and decode speed, float KV against int8 KV.

    flock -x /tmp/fleetlm-cpu.lock .venv/bin/python benchmarks/kv_cache_dtype.py \
        --batch-sizes 1,8 --input-len 1024 --output-len 64

For each `kv_cache_dtype` (auto: the model's dtype; int8) one engine with the same
`kv_cache_memory_bytes`: the KV blocks it holds, then per batch size the decode rate: a batch
of random prompts, prefilled in one step (the token budget holds them all), then decoded
together: decode tok/s = batch * (output-len - 1) / (last token time - first token time),
best of `--repeats`. Long prompts make each decode step read a long context, where the bytes
of the cache matter.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from fleetlm import LLM, SamplingParams
from fleetlm.bench.machine import cpu_name


def _prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(batch)]


def _decode_rate(llm: LLM, prompts, output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    metrics = [out.metrics for out in llm.generate(prompts, params)]
    first = max(m["first_token_time"] for m in metrics)
    last = max(m["last_token_time"] for m in metrics)
    return len(prompts) * (output_len - 1) / (last - first)


def bench(kv_cache_dtype: str, args) -> dict:
    llm = LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv_cache_dtype,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes, enable_prefix_caching=False,
              max_num_seqs=max(args.batch_sizes),
              max_num_batched_tokens=max(args.batch_sizes) * args.input_len)
    result = {"num_blocks": llm.engine.core.scheduler.kv_cache_manager.num_blocks,
              "decode_tokens_per_s": {}}
    _decode_rate(llm, _prompts(2, 16, args.seed), 4)  # warm-up (compiles the C kernels)
    for batch in args.batch_sizes:
        result["decode_tokens_per_s"][batch] = max(
            _decode_rate(llm, _prompts(batch, args.input_len, args.seed + repeat),
                         args.output_len) for repeat in range(args.repeats))
    llm.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-dtypes", default="auto,int8")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {kv: bench(kv, args) for kv in args.kv_cache_dtypes.split(",")}
    for kv, result in results.items():
        rates = ", ".join(f"batch {b}: {r:.1f} tok/s"
                          for b, r in result["decode_tokens_per_s"].items())
        print(f"kv_cache_dtype {kv:5s} {result['num_blocks']:6d} blocks; decode {rates}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": cpu_name(),
                                        "args": {k: v for k, v in vars(args).items()
                                                 if k != "out"},
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
