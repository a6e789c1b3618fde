"""Latency of the smallest request over HTTP at concurrency 1: what the served path adds.

    .venv/bin/python benchmarks/small_request_latency.py --base-url http://127.0.0.1:8000 \
        --num-requests 25 --out benchmarks/results/small-request-latency.json

One request at a time to /v1/completions: a 4-token prompt (token ids), max_tokens=1,
greedy. `plain`: time to the whole JSON response; `stream`: time to the first SSE event
that carries text (TTFT) and to `[DONE]`. Medians over `--num-requests` after 3 warm-ups.
Standard library only, so it measures the server, not a client library. `--offline`: the
same request through the offline `LLM` in this process with the model and engine settings of
`--config` (default configs/bench-cpu.yaml), the floor the served path is compared with.
`--interleaved`: both at once, request by request in turn (offline, plain, streamed, with a
pause between them so that neither engine's idle OpenMP threads still spin), so that the
machine's drift between runs cancels: medians of each and of the paired differences, the
figure item 6 of issue 12 bounds (what HTTP adds to time to first text).
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


def _offline_llm(config_path: Path):
    from fleetlm import LLM, SamplingParams
    from fleetlm.cluster.config import load_config

    config = load_config(config_path)  # the model and engine sections, as the server runs them
    llm = LLM(config.model.name, **config.model.model_dump(exclude={"name"}),
              **config.engine.model_dump())
    params = SamplingParams(max_tokens=1, temperature=0)

    def request() -> float:
        started = time.perf_counter()
        llm.generate([PROMPT_TOKEN_IDS], params)
        return time.perf_counter() - started

    for _ in range(NUM_WARMUP):
        request()
    return llm, request


def measure_offline(num_requests: int, config_path: Path) -> dict:
    llm, request = _offline_llm(config_path)
    totals = [request() * 1e3 for _ in range(num_requests)]
    llm.shutdown()
    return {"stream": "offline", "num_requests": num_requests,
            "first_text_ms_median": statistics.median(totals),
            "total_ms_median": statistics.median(totals),
            "total_ms_min": min(totals), "total_ms_max": max(totals)}


def measure_interleaved(base_url: str, model: str, num_requests: int, config_path: Path,
                        pause_s: float) -> dict:
    """Offline, plain and streamed requests in turn; each served time less the offline time
    next to it, per request."""
    llm, offline = _offline_llm(config_path)
    url = urlparse(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=60)
    bodies = {name: {"model": model, "prompt": PROMPT_TOKEN_IDS, "max_tokens": 1,
                     "temperature": 0, "stream": name == "stream"} for name in ("plain", "stream")}
    for _ in range(NUM_WARMUP):
        for body in bodies.values():
            _post(conn, body, body["stream"])
    samples: dict[str, list[float]] = {"offline": [], "plain": [], "stream": []}
    for _ in range(num_requests):
        for name in samples:
            time.sleep(pause_s)
            if name == "offline":
                seconds = offline()
            else:  # the time to the first text: the whole response, for a plain request
                seconds = _post(conn, bodies[name], bodies[name]["stream"])[0]
            samples[name].append(seconds * 1e3)
    conn.close()
    llm.shutdown()
    result = {"interleaved": True, "num_requests": num_requests, "pause_s": pause_s}
    for name, values in samples.items():
        result[f"{name}_ms_median"] = statistics.median(values)
        result[f"{name}_ms"] = values
    for name in ("plain", "stream"):
        added = [a - b for a, b in zip(samples[name], samples["offline"], strict=True)]
        result[f"{name}_added_ms_median"] = statistics.median(added)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=25)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--offline", action="store_true")
    parser.add_argument("--interleaved", action="store_true",
                        help="offline and HTTP requests in turn (see above)")
    parser.add_argument("--pause", type=float, default=0.05,
                        help="--interleaved: seconds between requests")
    parser.add_argument("--config", type=Path, default=Path("configs/bench-cpu.yaml"),
                        help="--offline: the deployment YAML whose model and engine to run")
    args = parser.parse_args()
    if args.interleaved:
        r = measure_interleaved(args.base_url, args.model, args.num_requests, args.config,
                                args.pause)
        print(f"offline {r['offline_ms_median']:.1f} ms, plain {r['plain_ms_median']:.1f} ms"
              f" (adds {r['plain_added_ms_median']:.1f}), streamed first text"
              f" {r['stream_ms_median']:.1f} ms (adds {r['stream_added_ms_median']:.1f});"
              f" medians of {r['num_requests']}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(r, indent=2) + "\n")
        return
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
