"""Offline throughput and prefix-cache TTFT: fleetlm against transformers generate(), same run.

    .venv/bin/python benchmarks/offline.py --batch-sizes 1,8,32 --num-prompts 64 \
        --input-len 256 --output-len 128 --out benchmarks/results/offline.json

Workload: random token ids (seeded) as prompts, every request generates exactly output-len
tokens (EOS ignored). fleetlm gets all prompts at once with max_num_seqs = batch size
(continuous batching); transformers runs static batches of that size with generate().
Throughput = output tokens / wall time from submission to the last token.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from fleetlm import LLM, SamplingParams


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def bench_fleetlm(model: str, dtype: str, prompts, output_len: int, batch_size: int,
                  device: str = "cpu", quantization: str | None = None,
                  kv_cache_dtype: str = "auto") -> dict:
    llm = LLM(model, dtype=dtype, device=device, max_num_seqs=batch_size, enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, len(prompts[0])),
              kv_cache_memory_bytes=2 << 30, quantization=quantization,
              kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_tokens == output_len * len(prompts)
    ttfts = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outputs]
    return {"output_tokens": num_tokens, "seconds": elapsed,
            "output_tokens_per_s": num_tokens / elapsed,
            "median_ttft_s": sorted(ttfts)[len(ttfts) // 2]}


def bench_transformers(model_dir: Path, dtype: str, prompts, output_len: int,
                       batch_size: int, device: str = "cpu") -> dict:
    import transformers

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype).to(device).eval()
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:1], device=device), **{**kwargs, "max_new_tokens": 4,
                                                     "min_new_tokens": 4})
        started = time.perf_counter()
        num_tokens = 0
        for i in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[i:i + batch_size], device=device)
            out = model.generate(batch, **kwargs)
            num_tokens += (out.shape[1] - batch.shape[1]) * batch.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    return {"output_tokens": num_tokens, "seconds": elapsed,
            "output_tokens_per_s": num_tokens / elapsed}


def bench_prefix_ttft(model: str, dtype: str, prefix_len: int, vocab: int, seed: int,
                      device: str = "cpu") -> dict:
    """TTFT of a prompt whose first prefix_len tokens an earlier request computed, against a
    prompt of the same length that shares nothing (median of 3 each)."""
    llm = LLM(model, dtype=dtype, device=device, kv_cache_memory_bytes=2 << 30,
              max_num_batched_tokens=prefix_len + 64)
    one = SamplingParams(temperature=0, max_tokens=1)
    rng = random.Random(seed)
    prefix = [rng.randrange(100, vocab) for _ in range(prefix_len)]

    def ttft(prompt) -> float:
        started = time.perf_counter()
        llm.generate([prompt], one)
        return time.perf_counter() - started

    def suffix():
        return [rng.randrange(100, vocab) for _ in range(32)]

    ttft(prefix + suffix())  # warm-up, and the earlier request that fills the cache
    hits = sorted(ttft(prefix + suffix()) for _ in range(3))
    misses = sorted(ttft([rng.randrange(100, vocab) for _ in range(prefix_len)] + suffix())
                    for _ in range(3))
    return {"prefix_len": prefix_len, "ttft_hit_s": hits[1], "ttft_miss_s": misses[1],
            "speedup": misses[1] / hits[1]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quantization", default=None,
                        help="fleetlm's only (e.g. gguf: the GGUF's blocks kept quantized)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="fleetlm's (e.g. int8)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=2000)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/offline.json"))
    args = parser.parse_args()

    from fleetlm.executor.weights import load_hf_config, resolve_model

    model_dir = resolve_model(args.model)
    vocab = load_hf_config(model_dir).vocab_size
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "throughput": []}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        row = {"batch_size": batch_size,
               "fleetlm": bench_fleetlm(args.model, args.dtype, prompts, args.output_len,
                                        batch_size, args.device, args.quantization,
                                        args.kv_cache_dtype)}
        if not args.skip_transformers:
            row["transformers"] = bench_transformers(model_dir, args.dtype, prompts,
                                                     args.output_len, batch_size, args.device)
        results["throughput"].append(row)
        print(json.dumps(row), flush=True)
    if args.prefix_len:
        results["prefix_ttft"] = bench_prefix_ttft(args.model, args.dtype, args.prefix_len,
                                                   vocab, args.seed, args.device)
        print(json.dumps(results["prefix_ttft"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
