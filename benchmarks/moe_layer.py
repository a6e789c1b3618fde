"""One mixture-of-experts layer on this CPU: the fused CPU path against transformers' per-expert
loop, and expert parallelism against tensor-parallel experts on two ranks.

    .venv/bin/python -m benchmarks.moe_layer --out docs/results/moe_layer.json

The layer has the shape of Qwen3-30B-A3B's (hidden 2048, 128 experts of width 768, top 8) in
float32, random weights. For each number of tokens in a step (1: a decode step of one
sequence; 512: a prefill chunk) it reports tokens/s of
  fused        `FusedExperts` (tokens grouped by expert, each expert's GEMMs once, oneDNN
               with prepacked weights), one process, one thread per rank as in a worker group
  loop         `per_expert_loop`, transformers' own implementation, same process
  per-token    `fused_experts_reference`, a Python loop over tokens and their experts (each
               token reads its experts' weights again; up to 128 tokens)
and, on two ranks joined by gloo (spawned processes, one thread each), the step time of
  tp           every rank holds half of every expert, all-reduce
  ep-allreduce each rank holds 64 whole experts, all-reduce (allgather_reducescatter)
  ep-all2all   each rank holds 64 whole experts, all-to-all of the routed tokens
Each figure is the median of `--repeats` timed runs after a warm-up, the paths compared taking
turns so that a noisy neighbour slows them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from fleetlm.executor.config import ParallelConfig
from fleetlm.executor.models.moe import FusedMoE
from fleetlm.kernels.moe import (
    FusedExperts,
    fused_experts_reference,
    per_expert_loop,
    select_experts,
)
from fleetlm.parallel.state import ParallelLayout, distributed_environment

HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K = 2048, 768, 128, 8
TOKEN_COUNTS = (1, 8, 32, 128, 512)
PER_TOKEN_MAX = 128  # the per-token loop takes seconds beyond


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=gen) / INTERMEDIATE**0.5
    return w13, w2


def _inputs(num_tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, HIDDEN, generator=gen),
            torch.randn(num_tokens, NUM_EXPERTS, generator=gen))


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up: packs the weights, allocates
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _interleaved_medians_s(fns: dict, repeats: int) -> dict[str, float]:
    """Each function timed `repeats` times, taking turns, after a warm-up of each: a noisy
    neighbour slows them alike, so their ratios hold."""
    for fn in fns.values():
        fn()  # warm-up: packs the weights, allocates
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def single_process(repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    w13, w2 = _weights()
    fused = FusedExperts(NUM_EXPERTS)
    rows = []
    with torch.inference_mode():
        for num_tokens in TOKEN_COUNTS:
            x, logits = _inputs(num_tokens)
            args = (x, w13, w2, *select_experts(logits, TOP_K, True))
            paths = {"fused": fused, "loop": per_expert_loop}
            if num_tokens <= PER_TOKEN_MAX:
                paths["per_token"] = fused_experts_reference
            seconds = _interleaved_medians_s(
                {name: (lambda fn=fn, args=args: fn(*args)) for name, fn in paths.items()}, repeats)
            row = {"tokens": num_tokens}
            for name, s in seconds.items():
                row[f"{name}_ms"] = s * 1e3
                row[f"{name}_tok_s"] = num_tokens / s
                if name != "fused":
                    row[f"speedup_vs_{name}"] = s / seconds["fused"]
            rows.append(row)
            print(f"tokens {num_tokens:4d}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in row.items() if k != "tokens"), flush=True)
    return rows


def _rank_main(rank: int, init_method: str, repeats: int, results) -> None:
    torch.set_num_threads(1)
    with distributed_environment(ParallelLayout(2, 1), rank, init_method, "gloo") as groups, \
            torch.inference_mode():
        tp = _loaded_layer(groups, ParallelConfig(tensor_parallel_size=2))
        ep = _loaded_layer(groups, ParallelConfig(tensor_parallel_size=2,
                                                  enable_expert_parallel=True))

        def with_backend(backend: str):
            def run(x, logits):
                ep.all2all_backend = backend  # the same experts, dispatched either way
                return ep(x, logits)
            return run

        modes = {"tp": tp, "ep-allreduce": with_backend("allgather_reducescatter"),
                 "ep-all2all": with_backend("all_to_all")}
        for num_tokens in TOKEN_COUNTS:
            x, logits = _inputs(num_tokens)
            groups.tp.all_reduce(torch.zeros(1))  # start together
            seconds = _interleaved_medians_s(
                {name: (lambda fn=fn, x=x, logits=logits: fn(x, logits))
                 for name, fn in modes.items()}, repeats)
            if rank == 0:
                results.put((num_tokens, seconds))


def _loaded_layer(groups, parallel: ParallelConfig) -> FusedMoE:
    layer = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, True, groups.tp, parallel)
    w13, w2 = _weights()
    for expert in range(NUM_EXPERTS):
        layer.weight_loader(layer.w13, w13[expert, :INTERMEDIATE], (expert, 0))
        layer.weight_loader(layer.w13, w13[expert, INTERMEDIATE:], (expert, 1))
        layer.weight_loader(layer.w2, w2[expert], (expert, None))
    return layer


def two_ranks(repeats: int) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank_main, args=(rank, init_method, repeats, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    timings: dict[int, dict[str, float]] = {}
    for _ in TOKEN_COUNTS:
        num_tokens, seconds = results.get(timeout=1800)
        timings[num_tokens] = {mode: s * 1e3 for mode, s in seconds.items()}
        print(f"two ranks, tokens {num_tokens:4d}: " + ", ".join(
            f"{mode} {ms:.1f} ms" for mode, ms in timings[num_tokens].items()), flush=True)
    for process in processes:
        process.join()
        if process.exitcode:
            raise SystemExit(f"a rank exited with {process.exitcode}")
    return [{"tokens": n, **{f"{mode}_ms": ms for mode, ms in t.items()}}
            for n, t in sorted(timings.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}", flush=True)
    report = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
              "shape": {"hidden": HIDDEN, "intermediate": INTERMEDIATE,
                        "experts": NUM_EXPERTS, "top_k": TOP_K, "dtype": "float32"},
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "single_process": single_process(args.repeats),
              "two_ranks": two_ranks(args.repeats)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
