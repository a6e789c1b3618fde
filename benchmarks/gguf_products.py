"""The GGUF kernel's integer products against the dequantized weight's GEMM, per matrix of the
built-in model (SmolLM2-135M's Q4_1 layer 0 and Q8_0 LM head), at several numbers of rows.

    flock -x /tmp/fleetlm-cpu.lock .venv/bin/python benchmarks/gguf_products.py \
        --rows 1,8,32,64,256 --out docs/results/wide-tiles/products.json

For each matrix and row count, the median time of:
- `int8[BUILD]`: `fleet_gguf_matmul_q8` called directly (input rounding to int8 included), in
  each build of `--builds`: `native` (this CPU's flags: on AVX2, Q4_0/Q4_1 take the wide
  tiles) and `four-row` (the same source with `-DFLEET_NO_WIDE_TILES`: the four-row tiles
  every type took before), so both are timed on one commit, alternately; `one-tile` (asked
  for by name) is the wide tiles as first built, one tile of two input rows a pass;
  `unpacked` is `native` on the Q4 weights in GGUF's rows, as they were multiplied before
  they were repacked at load (each call transposing eight rows' blocks), and `buffered`
  decodes the packed tiles into the per-thread buffer even at one pass of input rows. Each
  matrix stays in the caches between calls here: a decode step reads them from memory
  (`kernel_ab.py` times whole steps);
- `gemm`: what `gguf_linear.matmul` did from 64 rows before the wide tiles: the weight
  dequantized to fp32 (16 MiB slices) and oneDNN's GEMM (from 16 rows only).
A layer's four matrices are also summed ("layer").
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import timeit
from pathlib import Path

import torch

from fleetlm import LLM
from fleetlm.bench.machine import cpu_name
from fleetlm.kernels import cpu_build, gguf_linear

MODEL = "smollm2-135m-instruct"
MATRICES = {"qkv_proj": "layers.0.self_attn.qkv_proj", "o_proj": "layers.0.self_attn.o_proj",
            "gate_up_proj": "layers.0.mlp.gate_up_proj", "down_proj": "layers.0.mlp.down_proj",
            "lm_head": "lm_head"}
LAYER = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
BUILDS = {"native": (), "four-row": ("-DFLEET_NO_WIDE_TILES",),
          # the wide tiles as first built: one tile of two input rows a pass
          "one-tile": ("-DWIDE_TILES=1", "-DWIDE_X_ROWS=2"), "unpacked": (),
          # packed Q4 tiles decoded into the per-thread buffer at every row count
          "buffered": ("-DWIDE_IN_PLACE_ROWS=0",)}


def median_ms(fn, reps: int) -> float:
    fn()  # a warm-up call, not timed
    return statistics.median(timeit.repeat(fn, number=1, repeat=reps)) * 1e3


def int8_product(library, x: torch.Tensor, weight: gguf_linear.GGUFWeight) -> torch.Tensor:
    y = torch.empty(x.shape[0], weight.shape[0])
    gguf_linear._check(library.fleet_gguf_matmul_q8(
        x.data_ptr(), x.shape[0], x.shape[1], weight.data.data_ptr(), weight.shape[0],
        weight.kernel_type, y.data_ptr(), torch.get_num_threads()))
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,64,256")
    parser.add_argument("--builds", default="native,four-row")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    llm = LLM(MODEL, dtype="float32", quantization="gguf", max_num_seqs=1,
              kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False)
    model = llm.engine.executor.runner.model
    libraries = {name: gguf_linear.load_library(cpu_build.COMPILE_FLAGS + BUILDS[name])
                 for name in args.builds.split(",")}
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for matrix, path in MATRICES.items():
            weight = model.get_submodule(path).weight.quantized.whole
            for rows in rows_list:
                x = torch.randn(rows, weight.shape[1])
                reps = 21 if rows <= 32 else 7
                row = {"matrix": matrix, "shape": list(weight.shape),
                       "qtype": weight.qtype.name, "rows": rows}
                for name, library in libraries.items():
                    packed = library.has_wide_tiles and name != "unpacked"
                    row[f"int8_{name}_ms"] = median_ms(functools.partial(
                        int8_product, library, x, weight.repacked(packed and weight.packed)),
                        reps)
                if rows >= gguf_linear.GEMM_MIN_ROWS:
                    row["gemm_ms"] = median_ms(functools.partial(
                        gguf_linear._dequantized_matmul, x, weight, gguf_linear._library()), reps)
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nlayer 0's four matrices (ms), {cpu_name()}:")
    for rows in rows_list:
        layer = [r for r in results if r["rows"] == rows and r["matrix"] in LAYER]
        sums = {key: sum(r[key] for r in layer) for key in layer[0] if key.endswith("_ms")}
        print(f"  {rows:4d} rows: " + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in sums.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_name(), "threads": torch.get_num_threads(),
                                        "model": MODEL, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
