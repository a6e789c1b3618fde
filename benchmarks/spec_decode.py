"""Speculative decoding on this machine: output tokens/s with and without it.

    .venv/bin/python benchmarks/spec_decode.py --out docs/results/spec_decode.json

Workloads, on the built-in model (greedy, chat template):
  copying   the answer copies the input: repeat a paragraph, fix one word in a paragraph,
            continue a given Python file (the n-gram proposer's case)
  random    random-token prompts of 256 tokens, 128 output tokens with EOS ignored, greedy
            (the serving benchmark's random workload; this small model's greedy answers to
            noise soon repeat themselves, which prompt lookup catches)
  random-t1 the same sampled at temperature 1: nothing to copy, drafts are mostly wrong
            (what the adaptivity must protect)
Each at concurrency 1 (requests one after another) and 8 (all at once), plain, with the
n-gram proposer (k = 4), and on `copying` with a draft model: a random-weight two-layer model
with the built-in tokenizer (it shows the mechanism; its acceptance is near zero). Every
setup runs `--repeats` times interleaved; the table keeps the median.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import transformers

from fleetlm import LLM, SamplingParams
from fleetlm.executor.weights import load_tokenizer, resolve_model

PARAGRAPH = (
    "Ray is an open-source unified framework for scaling AI and Python applications. It "
    "provides the compute layer for parallel processing so that you don't need to be a "
    "distributed systems expert. Ray minimizes the complexity of running your distributed "
    "individual workflows and end-to-end machine learning workflows."
)
CODE = '''def load_config(path):
    """Read a YAML file and return its mapping."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def save_config(path, data):
'''
COPYING = [
    f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}",
    f"Rewrite this paragraph, replacing 'Ray' with 'Dask' and changing nothing else:\n\n"
    f"{PARAGRAPH}",
    f"Here is a Python file:\n\n{CODE}\nRepeat the file above, then complete save_config.",
    "Copy this list, one item per line:\n" + "\n".join(
        f"- item {i}: {w}" for i, w in enumerate(PARAGRAPH.split()[:12])),
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}


def copying_prompts(llm: LLM, num: int) -> list[list[int]]:
    return [llm.apply_chat_template([{"role": "user", "content": COPYING[i % len(COPYING)]}])
            for i in range(num)]


def random_prompts(num: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(num)]


def measure(llm: LLM, prompts, params: SamplingParams, concurrency: int) -> dict:
    """Output tokens/s over all prompts, `concurrency` at a time."""
    before = llm.engine.stats()
    started = time.perf_counter()
    outputs = []
    for i in range(0, len(prompts), concurrency):
        outputs += llm.generate(prompts[i:i + concurrency], params)
    elapsed = time.perf_counter() - started
    after = llm.engine.stats()
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    drafts = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    return {"output_tokens_per_s": num_tokens / elapsed, "output_tokens": num_tokens,
            "draft_tokens": drafts, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else None,
            "token_ids": [o.outputs[0].token_ids for o in outputs]}


def random_draft_dir(folder: Path) -> str:
    builtin = resolve_model("smollm2-135m-instruct")
    config = transformers.AutoConfig.from_pretrained(builtin)
    config.num_hidden_layers = 2
    config.save_pretrained(folder)
    load_tokenizer(builtin).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--copy-output-len", type=int, default=128)
    parser.add_argument("--random-input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    common = dict(dtype="auto", kv_cache_memory_bytes=512 << 20, max_num_seqs=8,
                  enable_prefix_caching=False)
    with tempfile.TemporaryDirectory() as folder:
        setups = {"plain": {}, "ngram": {"speculative_config": NGRAM},
                  "draft (random 2-layer)": {"speculative_config": {
                      "model": random_draft_dir(Path(folder)), "random_weights": True,
                      "num_speculative_tokens": 4}}}
        engines = {name: LLM(**common, **extra) for name, extra in setups.items()}
        workloads = {
            "copying": (copying_prompts(engines["plain"], args.num_prompts),
                        SamplingParams(temperature=0, max_tokens=args.copy_output_len)),
            "random": (random_prompts(args.num_prompts, args.random_input_len),
                       SamplingParams(temperature=0, max_tokens=args.random_output_len,
                                      ignore_eos=True)),
            "random-t1": (random_prompts(args.num_prompts, args.random_input_len),
                          SamplingParams(temperature=1.0, seed=0,
                                         max_tokens=args.random_output_len, ignore_eos=True)),
        }
        points = [(w, c, s) for w in workloads for c in (1, 8) for s in setups
                  if not (s.startswith("draft") and w != "copying")]
        samples: dict[tuple, list[dict]] = {p: [] for p in points}
        warm_up = workloads["copying"][0][:1]
        for llm in engines.values():
            llm.generate(warm_up, SamplingParams(temperature=0, max_tokens=8))
        for _ in range(args.repeats):
            for workload, concurrency, setup in points:
                prompts, params = workloads[workload]
                result = measure(engines[setup], prompts, params, concurrency)
                samples[(workload, concurrency, setup)].append(result)
                print(workload, concurrency, setup,
                      round(result["output_tokens_per_s"], 1), result["acceptance_rate"],
                      flush=True)
        for llm in engines.values():
            llm.shutdown()
    rows = []
    for (workload, concurrency, setup), runs in samples.items():
        plain = statistics.median(r["output_tokens_per_s"]
                                  for r in samples[(workload, concurrency, "plain")])
        speed = statistics.median(r["output_tokens_per_s"] for r in runs)
        same = runs[0]["token_ids"] == samples[(workload, concurrency, "plain")][0]["token_ids"]
        rows.append({"workload": workload, "concurrency": concurrency, "setup": setup,
                     "output_tokens_per_s": speed, "vs_plain": speed / plain,
                     "acceptance_rate": runs[0]["acceptance_rate"],
                     "same_tokens_as_plain": same,
                     "samples_tokens_per_s": [r["output_tokens_per_s"] for r in runs]})
        print(rows[-1])
    result = {"machine": _cpu(), "args": vars(args) | {"out": str(args.out)}, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def _cpu() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"cpu": model, "cores": os.cpu_count()}


if __name__ == "__main__":
    main()
