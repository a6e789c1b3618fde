"""Structured outputs on this machine: the per-token cost of a JSON-schema constraint.

    .venv/bin/python benchmarks/structured_outputs.py --out docs/results/structured_outputs.json

The built-in model decodes `--max-tokens` tokens per request (EOS ignored, temperature 1,
seeded) at concurrency 1 and 32, free and constrained by a JSON schema (an array of at
least 50 records, so the grammar stays open for the whole run). Both produce the same number
of tokens, so the difference in time per decode step is the grammar's: the mask filled on the
grammar thread (overlapping the forward pass; any of it not hidden shows up here) and applied
to the logits. Runs are interleaved, `--repeats` times; the table keeps the median. It also
times the two parts alone: filling the masks of a 32-request step, and applying them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fleetlm import LLM, SamplingParams
from fleetlm.executor.sampling_params import StructuredOutputsParams
from fleetlm.executor.structured import GrammarBackend, RequestGrammars, apply_token_bitmask
from fleetlm.executor.structured.request_grammars import MaskRequest
from fleetlm.executor.weights import load_tokenizer, resolve_model

MODEL = "smollm2-135m-instruct"
SCHEMA = {
    "type": "array", "minItems": 50,
    "items": {"type": "object", "additionalProperties": False,
              "required": ["name", "age", "city", "tags"],
              "properties": {"name": {"type": "string"},
                             "age": {"type": "integer", "minimum": 0},
                             "city": {"type": "string"},
                             "tags": {"type": "array", "items": {"type": "string"}}}},
}
PROMPT = "List people as JSON records with name, age, city and tags:"


def run_batch(llm: LLM, concurrency: int, max_tokens: int, is_constrained: bool) -> dict:
    constraint = StructuredOutputsParams(json=SCHEMA) if is_constrained else None
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, ignore_eos=True,
                             structured_outputs=constraint) for i in range(concurrency)]
    started = time.perf_counter()
    outputs = llm.generate([PROMPT] * concurrency, params)
    elapsed = time.perf_counter() - started
    num_tokens = [len(o.outputs[0].token_ids) for o in outputs]
    assert num_tokens == [max_tokens] * concurrency, num_tokens
    if is_constrained:  # the grammar held: every output is a prefix of schema-valid JSON
        assert all(o.outputs[0].text.startswith('[{"name": "') for o in outputs)
    return {"seconds": elapsed, "ms_per_step": 1000 * elapsed / max_tokens}


def mask_parts(num_requests: int, num_steps: int) -> dict:
    """Fill (grammar thread) and apply (sampler) alone, for `num_requests` rows a step."""
    tokenizer = load_tokenizer(resolve_model(MODEL))
    backend = GrammarBackend(tokenizer, tokenizer.vocab_size)
    grammars = RequestGrammars(lambda: backend, tokenizer.vocab_size)
    text = json.dumps([{"name": f"Person {i}", "age": 20 + i, "city": "Lyon", "tags": ["a", "b"]}
                       for i in range(50)])
    token_ids = tokenizer.encode(text)[:num_steps + 1]
    for i in range(num_requests):
        grammars.add(str(i), StructuredOutputsParams(json=SCHEMA))
    logits = torch.randn(num_requests, tokenizer.vocab_size)
    fill_s, apply_s = [], []
    for step in range(num_steps):
        new = token_ids[step - 1:step] if step else []
        requests = [MaskRequest(str(i), new) for i in range(num_requests)]
        started = time.perf_counter()
        result = grammars.start_bitmask(requests, [1] * num_requests).result()
        fill_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        apply_token_bitmask(logits, result.bitmask, result.rows)
        apply_s.append(time.perf_counter() - started)
    grammars.shutdown()
    return {"fill_ms_per_step": 1000 * statistics.median(fill_s),
            "apply_ms_per_step": 1000 * statistics.median(apply_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict = {"parts": {c: mask_parts(c, 100) for c in args.concurrency}, "runs": {}}
    with LLM(MODEL, max_num_seqs=max(args.concurrency)) as llm:
        run_batch(llm, 2, 8, True)  # warm-up: kernels, the grammar compiler
        for concurrency in args.concurrency:
            times: dict[str, list[float]] = {"free": [], "json_schema": []}
            for _ in range(args.repeats):
                for mode, values in times.items():
                    run = run_batch(llm, concurrency, args.max_tokens, mode != "free")
                    values.append(run["ms_per_step"])
            free, constrained = (statistics.median(times[m]) for m in ("free", "json_schema"))
            results["runs"][concurrency] = {"free_ms_per_step": free,
                                            "constrained_ms_per_step": constrained,
                                            "overhead": constrained / free - 1, "all": times}
    print(f"{'concurrency':>11} {'free ms/step':>13} {'json ms/step':>13} {'overhead':>9} "
          f"{'fill ms':>8} {'apply ms':>9}")
    for concurrency, run in results["runs"].items():
        part = results["parts"][concurrency]
        print(f"{concurrency:>11} {run['free_ms_per_step']:>13.1f} "
              f"{run['constrained_ms_per_step']:>13.1f} {run['overhead']:>8.1%} "
              f"{part['fill_ms_per_step']:>8.2f} {part['apply_ms_per_step']:>9.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
