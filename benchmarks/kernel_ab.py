"""Two or more versions of the C kernels, alternated in one process on the built-in model's
GGUF path: a 256-token prefill and decode steps at several batch sizes.

On the 2-vCPU VMs of docs/benchmarks.md one process can run 5-10% slower or faster than the
next, which hides a kernel change of that size when each version runs in a process of its
own (`step_parts.py` before and after). Here every version's libraries (`gguf_matmul.c` for
the layer loop, `paged_attention.c` for a prefill's attention, `decode_stack.c` with the
kernels it links for a decode step) are built from its own copy of `fleetlm/kernels/csrc` and
loaded side by side, and the model switches between them step by step, so every version sees
the same machine at the same time.

    mkdir -p /tmp/old && git archive OLD fleetlm/kernels/csrc | tar -x -C /tmp/old
    flock -x /tmp/fleetlm-cpu.lock .venv/bin/python benchmarks/kernel_ab.py \\
        before=/tmp/old/fleetlm/kernels/csrc after=fleetlm/kernels/csrc --out F

Q4_0 / Q4_1 / Q8_0 matrices are repacked at load (`GGUFWeight.packed`). Each version gets
the matrices of the types its kernels take in tiles packed (`gguf_linear._packed_types`: none
before `fleet_gguf_repack`, Q4_0 / Q4_1 before `fleet_gguf_packed_types`) and the others in
GGUF's rows, with a decode stack per layout; one named in `--rows` gets every matrix in rows:
`rows=fleetlm/kernels/csrc packed=fleetlm/kernels/csrc --rows rows` compares the two layouts
on one build.

Per version: the median of `--prefills` one-token generates of fresh 256-token prompts (the
first of each version not counted), and per batch size the median over three rounds of
`--samples` alternations of the median of three decode steps (each round admits the batch's
prompts of `--input-len` tokens, prefills them, then decodes them with every version in turn).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from fleetlm import LLM, SamplingParams
from fleetlm.bench.machine import cpu_name
from fleetlm.kernels import cpu_attention, decode_stack, gguf_linear

MODEL = "smollm2-135m-instruct"
ROUNDS = 3  # decode: batches admitted, each timed with every version in turn
STEPS_PER_SAMPLE = 3


def load_version(csrc: Path):
    """(the gguf_matmul library, the decode_stack library, the paged_attention library) built
    from the sources in `csrc`."""
    gguf_source, stack_source, stack_linked, attention_source = (
        gguf_linear.SOURCE, decode_stack.SOURCE, decode_stack.LINKED, cpu_attention.SOURCE)
    try:
        gguf_linear.SOURCE = csrc / gguf_source.name
        decode_stack.SOURCE = csrc / stack_source.name
        decode_stack.LINKED = tuple(csrc / path.name for path in stack_linked)
        cpu_attention.SOURCE = csrc / attention_source.name
        return (gguf_linear.load_library(), decode_stack._library.__wrapped__(),
                cpu_attention._library.__wrapped__())
    finally:
        gguf_linear.SOURCE, decode_stack.SOURCE, decode_stack.LINKED, cpu_attention.SOURCE = (
            gguf_source, stack_source, stack_linked, attention_source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="NAME=CSRC_DIR, two or more")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--prefills", type=int, default=8)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    parser.add_argument("--rows", default="", help="versions given the weights in GGUF's rows")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    versions = dict(v.split("=", 1) for v in args.versions)
    libraries = {name: load_version(Path(csrc)) for name, csrc in versions.items()}
    if any(None in pair for pair in libraries.values()):
        raise SystemExit("a version's kernels did not build (no C compiler?)")
    llm = LLM(MODEL, quantization="gguf", dtype="float32", max_num_seqs=32,
              max_num_batched_tokens=8192, kv_cache_memory_bytes=2 << 30,
              enable_prefix_caching=False, kv_cache_dtype=args.kv_cache_dtype)
    engine, model = llm.engine, llm.engine.executor.runner.model
    matrices = [p.quantized for p in model.parameters()
                if isinstance(getattr(p, "quantized", None), gguf_linear.QuantizedMatrix)]
    rows = set(filter(None, args.rows.split(",")))
    # per version, the types it takes packed; per such set (a layout), each matrix's parts
    packed_types = {name: frozenset() if name in rows else gguf.packed_types
                    for name, (gguf, _, _) in libraries.items()}
    layouts = {types: [[(row, part.repacked(part.packed and part.qtype in types))
                        for row, part in m.parts] for m in matrices]
               for types in set(packed_types.values())}

    def set_layout(types: frozenset) -> None:
        for matrix, parts in zip(matrices, layouts[types]):
            whole = len(parts) == 1 and parts[0][1].shape == matrix.shape
            matrix.parts, matrix._single = parts, parts[0][1] if whole else None

    stacks = {}  # a decode stack over each layout
    for types in layouts:
        set_layout(types)
        stacks[types] = model._make_decode_stack()

    def use(name: str) -> None:
        gguf, stack, attention = libraries[name]
        gguf_linear._library = lambda: gguf
        decode_stack._library = lambda: stack
        cpu_attention._library = lambda: attention
        types = packed_types[name]
        set_layout(types)
        model._native_stack, model._is_stack_made = stacks[types], True
        if model._native_stack is not None:
            model._native_stack._library = stack

    rng = random.Random(0)

    def prompt() -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(args.input_len)]

    results = {"cpu": cpu_name(), "versions": versions, "input_len": args.input_len,
               "kv_cache_dtype": args.kv_cache_dtype, "prefill_ms": {}, "decode_ms": {}}
    times = {name: [] for name in libraries}
    one_token = SamplingParams(max_tokens=1, temperature=0)
    for _ in range(args.prefills):
        for name in libraries:
            use(name)
            started = time.perf_counter()
            llm.generate([prompt()], one_token)
            times[name].append((time.perf_counter() - started) * 1e3)
    results["prefill_ms"] = {name: statistics.median(t[1:]) for name, t in times.items()}
    print(f"prefill of {args.input_len} tokens: " + "  ".join(
        f"{name} {ms:.1f} ms" for name, ms in results["prefill_ms"].items()), flush=True)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times = {name: [] for name in libraries}
        params = SamplingParams(max_tokens=2 + args.samples * STEPS_PER_SAMPLE * len(libraries),
                                temperature=0, ignore_eos=True)
        for round_ in range(ROUNDS):
            for i in range(batch):
                engine.add_request(f"b{batch}-{round_}-{i}", prompt(), params)
            engine.step()  # the prefill
            for _ in range(args.samples):
                for name in libraries:
                    use(name)
                    steps = []
                    for _ in range(STEPS_PER_SAMPLE):
                        started = time.perf_counter()
                        engine.step()
                        steps.append((time.perf_counter() - started) * 1e3)
                    times[name].append(statistics.median(steps))
            while engine.has_unfinished_requests():
                engine.step()
        results["decode_ms"][batch] = {name: statistics.median(t) for name, t in times.items()}
        print(f"decode step, {batch} sequences: " + "  ".join(
            f"{name} {ms:.2f} ms" for name, ms in results["decode_ms"][batch].items()), flush=True)
    llm.shutdown()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
