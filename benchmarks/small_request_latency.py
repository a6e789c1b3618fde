"""Latency of the smallest request over HTTP at concurrency 1: what the served path adds.

    .venv/bin/python benchmarks/small_request_latency.py --base-url http://127.0.0.1:8000 \
        --num-requests 25 --out benchmarks/results/small-request-latency.json

One request at a time to /v1/completions: a 4-token prompt (token ids), max_tokens=1,
greedy. `plain`: time to the whole JSON response; `stream`: time to the first SSE event
that carries text (TTFT) and to `[DONE]`. Medians over `--num-requests` after 3 warm-ups.
Standard library only, so it measures the server, not a client library. `--offline`: the
same request through the offline `LLM` in this process with the model and engine settings of
`--config` (default configs/bench-cpu.yaml), the floor the served path is compared with.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

PROMPT_TOKEN_IDS = [504, 3575, 282, 4649]  # 4 tokens of the built-in model's vocabulary
NUM_WARMUP = 3


def _post(conn: http.client.HTTPConnection, body: dict, stream: bool) -> tuple[float, float]:
    """(seconds to the first text, seconds to the end) of one request."""
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    if not stream:
        json.loads(response.read())
        elapsed = time.perf_counter() - started
        return elapsed, elapsed
    first = None
    while True:
        line = response.readline()
        if not line:
            break
        if first is None and line.startswith(b"data: {") and b'"text":"' in line \
                and b'"text":""' not in line:
            first = time.perf_counter() - started
        if line.strip() == b"data: [DONE]":
            response.read()
            break
    return first if first is not None else float("nan"), time.perf_counter() - started


def measure(base_url: str, model: str, num_requests: int, stream: bool) -> dict:
    url = urlparse(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=60)
    body = {"model": model, "prompt": PROMPT_TOKEN_IDS, "max_tokens": 1, "temperature": 0,
            "stream": stream}
    for _ in range(NUM_WARMUP):
        _post(conn, body, stream)
    samples = [_post(conn, body, stream) for _ in range(num_requests)]
    conn.close()
    firsts, totals = [s[0] * 1e3 for s in samples], [s[1] * 1e3 for s in samples]
    return {"stream": stream, "num_requests": num_requests,
            "first_text_ms_median": statistics.median(firsts),
            "total_ms_median": statistics.median(totals),
            "total_ms_min": min(totals), "total_ms_max": max(totals)}


def measure_offline(num_requests: int, config_path: Path) -> dict:
    from fleetlm import LLM, SamplingParams
    from fleetlm.cluster.config import load_config

    config = load_config(config_path)  # the model and engine sections, as the server runs them
    llm = LLM(config.model.name, **config.model.model_dump(exclude={"name"}),
              **config.engine.model_dump())
    params = SamplingParams(max_tokens=1, temperature=0)
    for _ in range(NUM_WARMUP):
        llm.generate([PROMPT_TOKEN_IDS], params)
    totals = []
    for _ in range(num_requests):
        started = time.perf_counter()
        llm.generate([PROMPT_TOKEN_IDS], params)
        totals.append((time.perf_counter() - started) * 1e3)
    llm.shutdown()
    return {"stream": "offline", "num_requests": num_requests,
            "first_text_ms_median": statistics.median(totals),
            "total_ms_median": statistics.median(totals),
            "total_ms_min": min(totals), "total_ms_max": max(totals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=25)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--offline", action="store_true")
    parser.add_argument("--config", type=Path, default=Path("configs/bench-cpu.yaml"),
                        help="--offline: the deployment YAML whose model and engine to run")
    args = parser.parse_args()
    if args.offline:
        results = [measure_offline(args.num_requests, args.config)]
    else:
        results = [measure(args.base_url, args.model, args.num_requests, stream)
                   for stream in (False, True)]
    names = {False: "plain ", True: "stream", "offline": "offline"}
    for r in results:
        print(f"{names[r['stream']]}: first text {r['first_text_ms_median']:.1f}"
              f" ms, whole {r['total_ms_median']:.1f} ms (median of {r['num_requests']};"
              f" min {r['total_ms_min']:.1f}, max {r['total_ms_max']:.1f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
