"""Disaggregated prefill/decode against colocated replicas at equal cores, on a mixed load.

    .venv/bin/python benchmarks/pd_mixed.py --out docs/results/pd_mixed.json

Both deployments serve the built-in model over HTTP with two one-thread engine replicas:
colocated (2 replicas, least-loaded routing) and P/D (1 prefill + 1 decode replica, KV over
TCP). The load is the one P/D exists for: `--streams` clients decode without pause (short
prompts, `--output-len` tokens, EOS ignored, a new request as soon as one ends) while long
prompts (`--long-len` tokens, 16 tokens out) arrive every `--long-every-s` seconds. Every
SSE event is one token (stream_interval_ms 0), so gaps between events are inter-token
latencies. Reported per deployment, median over `--repeats` runs: ITL p50/p99 of the
streaming clients, TTFT p50/p99 of both kinds, output tokens/s. Each run starts its own
local Ray cluster, so nothing else may run meanwhile (take the CPU lock exclusively).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

import aiohttp

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from fleetlm.bench.machine import cpu_name
from fleetlm.cluster.config import ClusterConfig

MODEL = "smollm2-135m-instruct"
PORT = 8791
WORDS = ("river city market station garden winter summer valley bridge tower harbor forest "
         "mountain village road castle lake island").split()


def base_config(kind: str) -> ClusterConfig:
    data = {
        "name": f"bench-{kind}",
        "model": {"max_model_len": 4096},
        "engine": {"kv_cache_memory_bytes": 512 << 20, "max_num_batched_tokens": 512},
        "replicas": {"num_cpus": 0.9, "num_threads": 1},
        "http": {"port": PORT, "stream_interval_ms": 0, "ingress_num_cpus": 0.1},
        "router": {"policy": "least_loaded"},
    }
    if kind == "colocated":
        data["replicas"]["count"] = 2
    else:
        data["pd"] = {"threshold_tokens": 256}
        data["kv_transfer"] = {"transport": "tcp"}
    return ClusterConfig.model_validate(data)


def text_of(num_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


async def one_request(session, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    times = []
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
    return {"ttft": times[0] - started, "gaps": [b - a for a, b in zip(times, times[1:])],
            "num_tokens": len(times)}


async def run_load(url: str, args, seed: int) -> dict:
    rng = random.Random(seed)
    deadline = time.perf_counter() + args.duration_s
    short, long = [], []

    async def streamer(session, index: int) -> None:
        while time.perf_counter() < deadline:
            short.append(await one_request(session, url, text_of(24, rng), args.output_len))

    async def long_prompts(session) -> None:
        tasks = []
        while time.perf_counter() < deadline:
            await asyncio.sleep(args.long_every_s)
            prompt = text_of(args.long_len, rng)
            tasks.append(asyncio.create_task(one_request(session, url, prompt, 16)))
        long.extend(await asyncio.gather(*tasks))

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(long_prompts(session),
                             *(streamer(session, i) for i in range(args.streams)))
        elapsed = time.perf_counter() - started
    gaps = sorted(g for r in short for g in r["gaps"])
    return {
        "itl_p50_ms": 1000 * _quantile(gaps, 0.5), "itl_p99_ms": 1000 * _quantile(gaps, 0.99),
        "itl_max_ms": 1000 * gaps[-1],
        "ttft_short_p50_ms": 1000 * _quantile(sorted(r["ttft"] for r in short), 0.5),
        "ttft_short_p99_ms": 1000 * _quantile(sorted(r["ttft"] for r in short), 0.99),
        "ttft_long_p50_ms": 1000 * _quantile(sorted(r["ttft"] for r in long), 0.5),
        "ttft_long_max_ms": 1000 * max(r["ttft"] for r in long),
        "output_tok_s": sum(r["num_tokens"] for r in short + long) / elapsed,
        "num_short": len(short), "num_long": len(long),
    }


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(kind: str, args, seed: int) -> dict:
    import ray
    from ray import serve

    from fleetlm.cluster.app import build_app, start_http, url_of

    config = base_config(kind)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20)
    try:
        start_http(config)
        serve.run(build_app(config), name=config.name, route_prefix="/")
        url = url_of(config)
        asyncio.run(run_load(url, argparse.Namespace(**{**vars(args), "duration_s": 5}), 0))
        return asyncio.run(run_load(url, args, seed))
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--long-len", type=int, default=1500, help="words (about 1 token each)")
    parser.add_argument("--long-every-s", type=float, default=4.0)
    parser.add_argument("--duration-s", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"colocated": [], "pd": []}
    for repeat in range(args.repeats):
        for kind in runs:  # interleaved, so drift hits both
            runs[kind].append(measure(kind, args, seed=repeat))
            print(kind, json.dumps(runs[kind][-1]), flush=True)
    medians = {kind: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for kind, results in runs.items()}
    report = {"cpu": cpu_name(), "args": vars(args) | {"out": str(args.out)},
              "medians": medians, "runs": runs}
    print(json.dumps(medians, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
