"""Worker groups on this machine: per-step control overhead, TP/PP throughput, the PP bubble.

    .venv/bin/python benchmarks/parallel.py --out docs/results/parallel.json

control     The local executor, then a Ray worker group of 1 and of 2 ranks through each
            control plane (ray, socket, shm), repeated and interleaved; medians of
            microseconds per step of (a) an empty step: the control path's round trip alone,
            and (b) one request decoding on a one-layer random model, one torch thread per
            rank and in the local run. At 2 ranks (b) also holds the model's gloo collectives,
            the same for every plane.
throughput  A model of the built-in one's size and shapes (30 layers, hidden 576, MLP 1536,
            vocabulary 49,152) with random weights and 12 heads of 48 with 6 KV heads instead
            of 9 of 64 with 3, so that both 2 and 3 divide its heads (the built-in model
            itself runs at TP=3, not at TP=2). Random prompts (seeded), EOS ignored, all
            submitted at once: output tokens/s and median TTFT for TP=1 (in-process), TP=2,
            TP=3 and PP=2 with 1 and 2 batches in flight. For workers: each rank's busy share
            of the run (time in steps minus time waiting for the previous stage); for PP its
            complement is the bubble.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
import transformers

from fleetlm import LLM, SamplingParams
from fleetlm.executor.outputs import CachedRequestData, SchedulerOutput
from fleetlm.executor.weights import load_tokenizer, resolve_model

BUILTIN = "smollm2-135m-instruct"
CONTROL_PLANES = ("ray", "socket", "shm")


def random_model_dir(folder: Path, **shape) -> str:
    """A random-weight Llama with the built-in tokenizer; `shape` overrides the built-in
    model's config."""
    builtin = resolve_model(BUILTIN)
    config = transformers.AutoConfig.from_pretrained(builtin)
    for key, value in shape.items():
        setattr(config, key, value)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    load_tokenizer(builtin).save_pretrained(folder)
    return str(folder)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, head_dim=32)
TP_FRIENDLY = dict(num_attention_heads=12, num_key_value_heads=6, head_dim=48)


def time_empty_steps(llm: LLM, num_steps: int) -> float:
    """Seconds per round trip of a step with nothing to compute: the control path alone
    (encode, carry to every rank, decode, reply)."""
    executor = llm.engine.executor
    empty = SchedulerOutput([], CachedRequestData(), {}, 0, set())
    executor.execute(empty)
    started = time.perf_counter()
    for _ in range(num_steps):
        executor.execute(empty)
    return (time.perf_counter() - started) / num_steps


def time_steps(llm: LLM, num_steps: int) -> float:
    """Seconds per engine step of one decoding request (after a warm-up)."""
    params = SamplingParams(temperature=0, max_tokens=num_steps, ignore_eos=True)
    llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    started = time.perf_counter()
    llm.generate([[5, 6, 7, 8]], params)
    return (time.perf_counter() - started) / num_steps


def bench_control(num_steps: int, repeats: int) -> list[dict]:
    """Each setup `repeats` times, interleaved (a slow moment of the machine hits all
    setups alike); medians of microseconds per step."""
    setups = [("local", 1, None)] + [(f"ray/{plane}", tp, plane)
                                     for tp in (1, 2) for plane in CONTROL_PLANES]
    samples: dict[tuple[str, int], list[float]] = {(name, tp): [] for name, tp, _ in setups}
    empty: dict[tuple[str, int], list[float]] = {(name, tp): [] for name, tp, _ in setups}
    torch.set_num_threads(1)  # as each worker (one CPU each): the same compute per step
    with tempfile.TemporaryDirectory() as folder:
        model = random_model_dir(Path(folder), **TINY)
        common = dict(random_weights=True, dtype="float32", kv_cache_memory_bytes=16 << 20)
        for _ in range(repeats):
            for name, tp, plane in setups:
                group = {} if plane is None else dict(
                    tensor_parallel_size=tp, executor_backend="ray", control_plane=plane,
                    worker_num_cpus=1.0)
                with LLM(model, **common, **group) as llm:
                    empty[(name, tp)].append(time_empty_steps(llm, num_steps) * 1e6)
                    samples[(name, tp)].append(time_steps(llm, num_steps) * 1e6)
                print(name, tp, round(empty[(name, tp)][-1]), round(samples[(name, tp)][-1]),
                      flush=True)
    local = statistics.median(samples[("local", 1)])
    return [{"executor": name, "ranks": tp,
             "empty_step_us": statistics.median(empty[(name, tp)]),
             "decode_step_us": statistics.median(values),
             "decode_overhead_us": statistics.median(values) - local,
             "samples_us": {"empty": empty[(name, tp)], "decode": values}}
            for (name, tp), values in samples.items()]


def random_prompts(num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(num)]


def bench_throughput(name: str, model: str, prompts, output_len: int, **engine_args) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with LLM(model, random_weights=True, enable_prefix_caching=False,
             kv_cache_memory_bytes=512 << 20, **engine_args) as llm:
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        executor = llm.engine.executor
        before = _stage_times(executor)
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - started
        after = _stage_times(executor)
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_tokens == output_len * len(prompts)
    ttfts = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outputs]
    row = {"setup": name, "output_tokens_per_s": num_tokens / elapsed,
           "median_ttft_s": statistics.median(ttfts), "seconds": elapsed}
    if before is not None:
        row["rank_busy_share"] = [round(((a[0] - b[0]) - (a[1] - b[1])) / elapsed, 3)
                                  for a, b in zip(after, before)]
    print(row, flush=True)
    return row


def run_throughput(args) -> list[dict]:
    prompts = random_prompts(args.num_prompts, args.input_len, seed=0)
    common = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=2048)
    workers = dict(worker_num_cpus=args.worker_cpus, **common)
    setups = [
        ("TP=1 (in-process)", common),
        ("TP=2", dict(tensor_parallel_size=2, **workers)),
        ("TP=3", dict(tensor_parallel_size=3, **workers)),
        ("PP=2, 1 batch in flight",
         dict(pipeline_parallel_size=2, max_batches_in_flight=1, **workers)),
        ("PP=2, 2 batches in flight", dict(pipeline_parallel_size=2, **workers)),
    ]
    with tempfile.TemporaryDirectory() as folder:
        model = random_model_dir(Path(folder), **TP_FRIENDLY)
        return [bench_throughput(name, model, prompts, args.output_len, **engine_args)
                for name, engine_args in setups]


def _stage_times(executor) -> list[tuple[float, float]] | None:
    """(time in steps, time waiting for the previous stage) per rank of a worker group."""
    if not hasattr(executor, "workers"):
        return None
    return executor.collective_rpc(lambda w: (w.step_s, w.runner.handoff.recv_wait_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="decode steps per control run")
    parser.add_argument("--repeats", type=int, default=3, help="control runs per setup")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--worker-cpus", type=float, default=1.0,
                        help="Ray CPUs per worker (its torch threads: at least 1)")
    parser.add_argument("--only", choices=["control", "throughput"], default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # As `fleetlm serve` starts local clusters: Ray's default worker niceness (15) makes every
    # worker lose the CPU to Ray's daemons and the driver.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 << 20, logging_level="WARNING")
    result = {"machine": {"cpu": platform.processor() or _cpu_model(), "cores": _num_cores()},
              "args": vars(args) | {"out": str(args.out)}}
    if args.only in (None, "control"):
        result["control"] = bench_control(args.steps, args.repeats)
    if args.only in (None, "throughput"):
        result["throughput"] = run_throughput(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _num_cores() -> int:
    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
