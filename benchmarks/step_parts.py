"""The decode step of the built-in model (SmolLM2-135M), split by part, against its
memory-bandwidth floor (issue 12, item 1).

For each weight path (float32: the file dequantized on load, oneDNN linear layers; bfloat16:
the same in bf16, what `dtype: auto` picks on CPUs with AVX512-BF16 or AMX; gguf: the file's
blocks kept quantized) and batch size, the script decodes `--output-len` tokens after
prompts of `--input-len` tokens (4 unless told) and reports:

- the median engine step, uninstrumented (one `LLMEngine.step()`, scheduling to detokenising);
- the same step split by part, measured in a second run by wrapping the model's building
  blocks in timers (exclusive time: a part's time excludes the parts it calls). Wrapping costs
  about a microsecond per call, so the parts add up to a little more than the plain step;
- the floor: weight bytes one step reads / this machine's read bandwidth (a sum over a 256 MiB
  tensor on all threads, on 4 KiB and on 2 MiB pages: the faster), read again before each
  repeat, and the step's ratio to it: the median of the repeats' ratios.

    flock -x /tmp/fleetlm-cpu.lock .venv/bin/python benchmarks/step_parts.py \
        --out docs/results/step_parts.json

With `--prefill N` it times the prefill of N fresh prompts of `--input-len` tokens instead
(the median of `--repeats` runs after one warm-up, then one run by part).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch

from fleetlm import LLM, SamplingParams
from fleetlm.bench.machine import cpu_name
from fleetlm.executor import attention, model_runner
from fleetlm.executor.engine import LLMEngine
from fleetlm.executor.models import llama, ops
from fleetlm.kernels import attention as attention_kernels
from fleetlm.kernels import decode_stack, huge_pages
from fleetlm.parallel import layers
from fleetlm.parallel.layers import weight_bytes

MODEL = "smollm2-135m-instruct"

# part name -> (owner, attribute) of the callables timed as that part. Owners are patched for
# the run only; nested parts are subtracted from their callers (exclusive time).
PARTS = {
    "engine (schedule, update, detokenize)": [(LLMEngine, "step")],
    "batch preparation (CPU tensors)": [(model_runner, "prepare_batch")],
    "model Python (layer loop, views)": [
        (llama.LlamaForCausalLM, "forward"), (llama.LlamaForCausalLM, "decode_argmax"),
        (llama.LlamaDecoderLayer, "forward"),
        (llama.LlamaAttention, "forward"), (attention.PagedAttention, "forward")],
    "embedding": [(layers.VocabParallelEmbedding, "forward")],
    "linear layers": [(layers.ColumnParallelLinear, "forward"),
                      (layers.RowParallelLinear, "forward")],
    "norms + residual": [(ops.RMSNorm, "forward"), (ops.RMSNorm, "add_and_norm")],
    "rotary": [(llama, "apply_rotary"), (ops.RotaryEmbedding, "cos_sin")],
    "activation (silu * up)": [(ops.GatedMLP, "forward")],
    "KV-cache write": [(attention_kernels, "write_kv_cache")],
    "attention kernel": [(attention_kernels, "paged_decode_attention"),
                         (attention_kernels, "paged_prefill_attention"),
                         (attention_kernels, "prefill_attention_no_cache")],
    "decode stack (one native call: every layer)": [(decode_stack.DecodeStack, "run"),
                                                    (decode_stack.DecodeStack, "run_model")],
    "LM head": [(layers.ParallelLMHead, "compute_logits")],
    "greedy step in one native call (stack, LM head, argmax)": [
        (decode_stack.DecodeStack, "run_model_argmax")],
    "sampler (metadata + sampling)": [(model_runner.ModelRunner, "_sample")],
}
MODEL_PARTS = ("model Python (layer loop, views)", "embedding", "linear layers",
               "norms + residual", "rotary", "activation (silu * up)", "KV-cache write",
               "attention kernel", "decode stack (one native call: every layer)")


class PartTimer:
    """Exclusive wall time per part: a timed call's time minus the timed calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []  # per open call: time spent in its timed children

    def wrap(self, part: str, fn):
        clock = time.perf_counter

        def timed(*args, **kwargs):
            self._stack.append(0.0)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                children = self._stack.pop()
                self.seconds[part] += elapsed - children
                self.calls[part] += 1
                if self._stack:
                    self._stack[-1] += elapsed
        return timed

    @contextmanager
    def patched(self):
        with ExitStack() as stack:
            for part, targets in PARTS.items():
                for owner, name in targets:
                    original = getattr(owner, name)
                    setattr(owner, name, self.wrap(part, original))
                    stack.callback(setattr, owner, name, original)
            yield self


class ReadBandwidth:
    """Bytes per second a sum over 256 MiB of fp32 reads on all threads, on 4 KiB pages and on
    2 MiB pages where the system grants them (a floor takes the best the machine does: on the
    2-vCPU EPYC huge pages read 5-40% faster, and the GGUF weights sit on them too:
    `huge_pages`; docs/benchmarks.md, 2026-12-07). This VM's bandwidth drifts by a third
    within minutes, so `measure` reads it again before each repeat and sets each repeat's
    step against the floor of its moment."""

    def __init__(self) -> None:
        huge = huge_pages.empty(256 << 20).view(torch.float32).fill_(1.0)
        self.buffers = {"4k": torch.ones(64 << 20), "2m": huge}

    def read(self, reps: int = 9) -> dict[str, float]:
        """GB/s per page size, the best of `reps` sums each."""
        result = {}
        for pages, data in self.buffers.items():
            data.sum()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                data.sum()
                times.append(time.perf_counter() - start)
            result[pages] = data.numel() * 4 / min(times) / 1e9
        return result


def bytes_per_step(llm: LLM) -> int:
    """Weight bytes one decode step reads: every matrix once (the embedding only by rows)."""
    model = llm.engine.executor.runner.model
    return sum(weight_bytes(p) for name, p in model.named_parameters(remove_duplicate=False)
               if name != "embed_tokens.weight")


def add_prompts(engine: LLMEngine, count: int, input_len: int, params: SamplingParams) -> None:
    """`count` distinct prompts of `input_len` tokens, none sharing a prefix block."""
    run = time.monotonic_ns()
    for i in range(count):
        prompt = [1] + [(100 + 7 * i + 13 * j) % 49000 + 2 for j in range(input_len - 1)]
        engine.add_request(f"r{run}-{i}", prompt, params)


def decode_steps(llm: LLM, batch_size: int, output_len: int, input_len: int = 4,
                 timer: PartTimer | None = None) -> list[float]:
    """Durations of the decode steps (every sequence past its prompt) of one run; `timer`
    times their parts (not the prefill steps')."""
    engine = llm.engine
    add_prompts(engine, batch_size, input_len,
                SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    scheduler = engine.core.scheduler
    while scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                       for r in scheduler.running):
        engine.step()  # the prefills
    durations = []
    with timer.patched() if timer is not None else nullcontext():
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            durations.append(time.perf_counter() - start)
    return durations


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(llm: LLM, batch_size: int, output_len: int, input_len: int, repeats: int,
            bandwidth: ReadBandwidth) -> dict:
    """The median step of `repeats` runs (each run's median step) and each run's ratio to the
    floor at the bandwidth read just before it; then the parts, from one instrumented run."""
    decode_steps(llm, batch_size, 4, input_len)  # warm-up
    plain, floors, nbytes = [], [], bytes_per_step(llm)
    for _ in range(repeats):
        floors.append(nbytes / max(bandwidth.read(5).values()) / 1e6)
        plain.append(median(decode_steps(llm, batch_size, output_len, input_len)))
    ratios = [step * 1e3 / floor for step, floor in zip(plain, floors)]
    timer = PartTimer()
    steps = decode_steps(llm, batch_size, output_len, input_len, timer)
    parts_ms = {part: timer.seconds[part] / len(steps) * 1e3 for part in PARTS}
    calls = {part: timer.calls[part] / len(steps) for part in PARTS}
    step_ms = median(plain) * 1e3
    return {"batch_size": batch_size, "step_ms": step_ms, "tokens_per_s": batch_size / step_ms
            * 1e3, "steps_ms": [step * 1e3 for step in plain], "floors_ms": floors,
            "ratios_to_floor": ratios, "ratio_to_floor": median(ratios),
            "instrumented_step_ms": sum(steps) / len(steps) * 1e3,
            "parts_ms": parts_ms, "calls_per_step": calls,
            "model_ms": sum(parts_ms[p] for p in MODEL_PARTS)}


def prefill(llm: LLM, num_prompts: int, input_len: int, timer: PartTimer | None = None
            ) -> float:
    """Seconds to prefill `num_prompts` fresh prompts of `input_len` tokens (and sample each
    one token); `timer` times the parts."""
    engine = llm.engine
    add_prompts(engine, num_prompts, input_len,
                SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    with timer.patched() if timer is not None else nullcontext():
        while engine.has_unfinished_requests():
            engine.step()
    return time.perf_counter() - start


def measure_prefill(llm: LLM, num_prompts: int, input_len: int, repeats: int) -> dict:
    prefill(llm, num_prompts, input_len)  # warm-up: first-touch of the activations' memory
    plain = [prefill(llm, num_prompts, input_len) for _ in range(repeats)]
    timer = PartTimer()
    prefill(llm, num_prompts, input_len, timer)
    return {"prefill_prompts": num_prompts, "input_len": input_len,
            "prefill_ms": median(plain) * 1e3,
            "tokens_per_s": num_prompts * input_len / median(plain),
            "parts_ms": {part: timer.seconds[part] * 1e3 for part in PARTS},
            "calls": dict(timer.calls)}


# --weights name -> (dtype, quantization)
WEIGHTS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
           "gguf": ("float32", "gguf")}


def load(weights: str, batch_size: int, kv_cache_dtype: str = "auto") -> LLM:
    dtype, quantization = WEIGHTS[weights]
    return LLM(MODEL, dtype=dtype, quantization=quantization, max_num_seqs=batch_size,
               kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False,
               kv_cache_dtype=kv_cache_dtype)


def print_table(label: str, figures: dict) -> None:
    ratios = ", ".join(f"{r:.2f}" for r in figures["ratios_to_floor"])
    print(f"\n{label}, batch {figures['batch_size']}: step {figures['step_ms']:.2f} ms "
          f"({figures['tokens_per_s']:.1f} tok/s); ratio to the floor "
          f"{figures['ratio_to_floor']:.2f}x (median of the repeats' {ratios}; floors "
          f"{min(figures['floors_ms']):.2f}-{max(figures['floors_ms']):.2f} ms)")
    print(f"  {'part':40s} {'ms/step':>8s} {'calls':>6s}")
    for part, ms in figures["parts_ms"].items():
        print(f"  {part:40s} {ms:8.2f} {figures['calls_per_step'][part]:6.0f}")
    print(f"  {'sum (instrumented step)':40s} {sum(figures['parts_ms'].values()):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="float32,gguf",
                        help=f"comma-separated, of: {', '.join(WEIGHTS)}")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=4,
                        help="prompt tokens per sequence (the context the decode attends to)")
    parser.add_argument("--prefill", type=int, default=0, metavar="N",
                        help="instead of decode steps: prefill N prompts of --input-len "
                             "tokens at once, by part")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="", help="stored with the results (before/after)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/step_parts.json"))
    args = parser.parse_args()
    read_bandwidth = ReadBandwidth()
    bandwidths = read_bandwidth.read()
    bandwidth = max(bandwidths.values())
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "model": MODEL,
              "torch": torch.__version__, "label": args.label, "input_len": args.input_len,
              "kv_cache_dtype": args.kv_cache_dtype,
              "read_bandwidth_gb_s": bandwidth, "read_bandwidth_by_pages_gb_s": bandwidths,
              "runs": []}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"read bandwidth {bandwidth:.1f} GB/s on {result['threads']} threads "
          f"({bandwidths['4k']:.1f} on 4 KiB pages, {bandwidths['2m']:.1f} on 2 MiB pages)")
    for weights in args.weights.split(","):
        llm = load(weights, max(batch_sizes + [args.prefill]), args.kv_cache_dtype)
        weight_bytes_ = bytes_per_step(llm)
        if args.prefill:
            figures = measure_prefill(llm, args.prefill, args.input_len, args.repeats)
            figures.update(weights=weights)
            result["runs"].append(figures)
            print(f"\n{weights}, prefill {args.prefill} x {args.input_len} tokens: "
                  f"{figures['prefill_ms']:.1f} ms ({figures['tokens_per_s']:.0f} tok/s)")
            for part, ms in figures["parts_ms"].items():
                print(f"  {part:40s} {ms:8.2f}")
            llm.shutdown()
            continue
        for batch_size in batch_sizes:
            figures = measure(llm, batch_size, args.output_len, args.input_len, args.repeats,
                              read_bandwidth)
            figures.update(weights=weights, weight_bytes_per_step=weight_bytes_)
            result["runs"].append(figures)
            print_table(weights, figures)
        llm.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
