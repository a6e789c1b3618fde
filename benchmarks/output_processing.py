"""Engine-thread cost of turning sampled tokens into outputs, cumulative against delta.

    .venv/bin/python benchmarks/output_processing.py --num-requests 32 --output-len 128

`OutputProcessor.process_outputs` (detokenize, stop strings, build `RequestOutput`s) for
`--num-requests` requests decoding `--output-len` tokens together, one token each per step,
on the built-in model's tokenizer; the figure is the CPU time per engine step (median of 5).
Cumulative outputs copy every request's whole token list each step; deltas copy the new
token only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from fleetlm.executor.output_processor import OutputProcessor
from fleetlm.executor.outputs import EngineCoreOutput
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.executor.weights import load_tokenizer, resolve_model


def run_once(tokenizer, output_kind: str, num_requests: int, output_len: int,
             logprobs: int | None) -> float:
    """Seconds of CPU per step."""
    rng = random.Random(0)
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=output_len, logprobs=logprobs, output_kind=output_kind,
                            stop=["\n\n\n\n\n"])
    for i in range(num_requests):
        prompt = [rng.randrange(100, 40000) for _ in range(256)]
        processor.add_request(str(i), None, prompt, params, 0.0)
    steps = [[EngineCoreOutput(str(i), [token], [[(token, -0.5)]] if logprobs is not None
                               else None, finish_reason="length" if s == output_len - 1
                               else None)
              for i, token in enumerate(rng.randrange(100, 40000) for _ in range(num_requests))]
             for s in range(output_len)]
    started = time.thread_time()
    for step in steps:
        processor.process_outputs(step)
    return (time.thread_time() - started) / output_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--logprobs", type=int, default=None)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    for kind in ("cumulative", "delta"):
        runs = [run_once(tokenizer, kind, args.num_requests, args.output_len, args.logprobs)
                for _ in range(5)]
        print(f"{kind:10}: {statistics.median(runs) * 1e3:.2f} ms of CPU per step "
              f"({args.num_requests} requests, {args.output_len} tokens each)")


if __name__ == "__main__":
    main()
