"""Routing policies side by side on a multi-tenant workload (llm-d's, scaled down).

    .venv/bin/python benchmarks/prefix_routing.py --out docs/results/prefix_routing.json

The same deployment (the built-in model, two one-thread replicas, `--num-blocks` KV blocks
each) is served four times, once per `router.policy`: round_robin, least_loaded,
approx_prefix and precise_prefix. Each time `fleetlm bench serve` sends the shared-prefix
workload over the chat endpoint: `--tenants` long system prompts (`--prefix-len` tokens)
and `--num-prompts` users (a short question each), in random order, `--concurrency` in
flight, or (`--request-rate R`) arriving as a Poisson process at R per second, as llm-d's
load does: an open loop, where a policy whose replicas cannot keep up queues without bound
while one that can keeps TTFT flat. The tenants' prompts together about fill the replicas' KV caches, so a replica
that sees every tenant evicts what the next request needs. Reported per policy (median of
`--repeats`, policies interleaved): output tokens/s, requests/s served, TTFT p50/p90 and the
replicas' prefix-cache hit rate (`/metrics`: hit tokens / queried tokens); each run's
per-request TTFTs are kept in the JSON's "runs". Each run starts its own
local Ray cluster: nothing else may run meanwhile (take the CPU lock exclusively).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from fleetlm.bench.machine import cpu_name
from fleetlm.cluster.config import ClusterConfig

POLICIES = ("round_robin", "least_loaded", "approx_prefix", "precise_prefix")
PORT = 8793
REQUESTS = "requests"  # a run's per-request rows: kept in "runs", not in the medians


def config_for(policy: str, args) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "name": "bench-routing",
        "model": {"max_model_len": max(2048, args.prefix_len + 1024)},
        "engine": {"num_blocks": args.num_blocks, "max_num_seqs": 8,
                   "max_num_batched_tokens": 512},
        "replicas": {"count": 2, "num_cpus": 0.9, "num_threads": 1},
        "router": {"policy": policy, "saturation_threshold": args.saturation_threshold},
        "http": {"port": PORT, "ingress_num_cpus": 0.1},
    })


def metric_counts(url: str) -> dict[str, float]:
    """Counters summed over the replicas: prefix-cache hit and queried tokens, and the
    affinity filter's decisions (`affinity_stuck`, `_spilled`, `_placed`, `_none`)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    totals = {"hits": 0.0, "queries": 0.0, **{f"affinity_{o}": 0.0
                                              for o in ("stuck", "spilled", "placed", "none")}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            if family.name == "fleetlm:prefix_cache_hits":
                totals["hits"] += sample.value
            elif family.name == "fleetlm:prefix_cache_queries":
                totals["queries"] += sample.value
            elif family.name == "fleetlm:router_decisions" and \
                    sample.labels.get("stage") == "affinity":
                totals[f"affinity_{sample.labels['outcome']}"] += sample.value
    return totals


def bench(url: str, args, seed: int, result_dir: Path) -> dict:
    command = [sys.executable, "-m", "fleetlm.bench", "serve", "--base-url", url,
               "--endpoint", "chat", "--workload", "shared-prefix",
               "--num-groups", str(args.tenants), "--prefix-len", str(args.prefix_len),
               "--input-len", str(args.input_len), "--output-len", str(args.output_len),
               "--num-prompts", str(args.num_prompts), "--max-concurrency",
               str(args.concurrency), "--seed", str(seed), "--result-dir", str(result_dir),
               "--disable-tqdm"]
    if args.request_rate is not None:
        command += ["--request-rate", str(args.request_rate)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    [point] = json.loads((result_dir / "results.json").read_text())["results"]
    return point


def measure(policy: str, args, seed: int) -> dict:
    import ray
    from ray import serve

    from fleetlm.cluster.app import build_app, start_http, url_of

    config = config_for(policy, args)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20)
    try:
        start_http(config)
        serve.run(build_app(config), name=config.name, route_prefix="/")
        url = url_of(config)
        before = metric_counts(url)
        with tempfile.TemporaryDirectory() as folder:
            point = bench(url, args, seed, Path(folder))
        after = metric_counts(url)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "output_tok_s": point["output_throughput"],
        "served_req_s": point["request_throughput"],
        "ttft_p50_ms": point["ttft_ms"]["median"], "ttft_p90_ms": point["ttft_ms"]["p90"],
        "prefix_hit_rate": (after["hits"] - before["hits"])
        / max(after["queries"] - before["queries"], 1.0),
        # the prefix policies' routing decisions: kept on the prefix's replica, or spilled
        **{key: after[key] - before[key] for key in after if key.startswith("affinity_")},
        "num_failed": point["num_failed"], "duration_s": point["duration_s"],
        # each request (conv_id "group<tenant>-user<n>") and the replica that served it (the
        # server's x-fleetlm-replica header), to see what a tail is made of
        REQUESTS: [{key: row.get(key)
                    for key in ("conv_id", "replica", "ttft_ms", "e2el_ms", "error")}
                   for row in point["requests"]],
        "tenant_replicas": tenant_replicas(point["requests"]),
    }


def tenant_replicas(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Requests per tenant and replica (replicas named r0, r1, ... in order of first
    appearance): a tenant that one replica served throughout has one entry."""
    short: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        tenant = row["conv_id"].partition("-")[0]
        replica = short.setdefault(row.get("replica") or "?", f"r{len(short)}")
        by_replica = counts.setdefault(tenant, {})
        by_replica[replica] = by_replica.get(replica, 0) + 1
    return dict(sorted(counts.items()))


def plot(medians: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("output_tok_s", "output tokens/s"), ("ttft_p90_ms", "TTFT p90 (ms)"),
            ("prefix_hit_rate", "prefix-cache hit rate")]
    figure, axes = plt.subplots(1, len(keys), figsize=(12, 3.2))
    for axis, (key, title) in zip(axes, keys):
        axis.bar(list(medians), [values[key] for values in medians.values()], color="#4878a8")
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests in flight (a cap on the open loop's)")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="Poisson arrivals per second (default: a closed loop)")
    parser.add_argument("--num-blocks", type=int, default=128, help="KV blocks per replica")
    parser.add_argument("--saturation-threshold", type=int, default=5,
                        help="router.saturation_threshold (the prefix policies' valve)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {policy: [] for policy in args.policies}
    for repeat in range(args.repeats):
        for policy, results in runs.items():  # interleaved, so drift hits every policy
            results.append(measure(policy, args, seed=repeat))
            print(policy, json.dumps({k: v for k, v in results[-1].items() if k != REQUESTS}),
                  flush=True)
    medians = {policy: {key: statistics.median(r[key] for r in results)
                        for key, value in results[0].items() if isinstance(value, (int, float))}
               for policy, results in runs.items()}
    report = {"cpu": cpu_name(), "args": vars(args) | {"out": str(args.out)},
              "medians": medians, "runs": runs}
    print(json.dumps(medians, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        plot(medians, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
