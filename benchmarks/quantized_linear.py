"""Quantized weights against the float32 model, on the built-in SmolLM2-135M: GGUF kept
quantized (`quantization: gguf`: Q4_1 layers, Q8_0 embedding and LM head) and W8A8 INT8 (the
compressed-tensors checkpoint `fleetlm quantize --scheme W8A8` writes: int8 layers, the LM
head left float as LLM Compressor leaves it):

1. GEMV/GEMM per linear shape of the model at 1, 8 and 32 input rows: fp32 oneDNN with the
   weight prepacked (`PackedLinear`, the float path) against the GGUF kernel on the file's
   own blocks (`gguf_linear.matmul`, with fp32 activations and with int8 ones: integer dot
   products, the default below 16 rows), the W8A8 kernel (`int8_linear.w8a8_linear`: per-token
   quantization of the input included) and torch's own int8 GEMM (`torch._int_mm`, on
   already quantized inputs), median of several timings;
2. offline decode throughput of the whole model, float32 against each quantized variant, at
   batch 1 and 8 (4-token prompts, so decode dominates; median of 3 runs), with the bytes of
   weights each step reads.

    flock -x /tmp/fleetlm-cpu.lock .venv/bin/python benchmarks/quantized_linear.py \
        --out docs/results/quantized_linear.json
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch

from fleetlm import LLM, SamplingParams
from fleetlm.bench.machine import cpu_name
from fleetlm.executor.weights.quantize import quantize_checkpoint, quantize_weight
from fleetlm.kernels import gguf_linear, int8_linear
from fleetlm.kernels.cpu_linear import PackedLinear
from fleetlm.parallel.layers import weight_bytes

MODEL = "smollm2-135m-instruct"
# (name, module whose weight is timed) of layer 0, and the LM head.
LINEARS = {"qkv_proj": "layers.0.self_attn.qkv_proj", "o_proj": "layers.0.self_attn.o_proj",
           "gate_up_proj": "layers.0.mlp.gate_up_proj", "down_proj": "layers.0.mlp.down_proj",
           "lm_head": "lm_head"}


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2] * 1e3


def load(quantization: str | None, batch_size: int, model: str = MODEL) -> LLM:
    return LLM(model, dtype="float32", quantization=quantization, max_num_seqs=batch_size,
               kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False)


def bytes_per_step(llm: LLM) -> int:
    """Weight bytes one decode step reads: every matrix once (the embedding only by rows)."""
    model = llm.engine.executor.runner.model
    return sum(weight_bytes(p) for name, p in model.named_parameters(remove_duplicate=False)
               if name != "embed_tokens.weight")


def gemm_figures(float_llm: LLM, quantized_llm: LLM, rows_list: list[int], reps: int) -> list:
    float_model = float_llm.engine.executor.runner.model
    quantized_model = quantized_llm.engine.executor.runner.model
    results = []
    for name, path in LINEARS.items():
        dense = float_model.get_submodule(path).weight
        blocks = quantized_model.get_submodule(path).weight.quantized
        assert len(blocks.parts) == 1
        weight = blocks.parts[0][1]
        packed = PackedLinear()
        data, scale = quantize_weight(dense.detach())
        int8 = (data, scale.reshape(-1).contiguous())
        for rows in rows_list:
            x = torch.randn(rows, dense.shape[1])
            with torch.inference_mode():
                onednn = median_ms(functools.partial(packed, x, dense), reps)
                gguf = median_ms(functools.partial(gguf_linear.matmul, x, weight,
                                                   int8_dot=False), reps)
                gguf_int8 = median_ms(functools.partial(gguf_linear.matmul, x, weight,
                                                        int8_dot=True), reps)
                w8a8 = median_ms(functools.partial(int8_linear.w8a8_linear, x, *int8), reps)
                xq, _ = int8_linear.quantize_rows(x)
                int_mm = median_ms(functools.partial(torch._int_mm, xq, int8[0].T), reps)
            results.append({"linear": name, "shape": list(dense.shape), "rows": rows,
                            "qtype": weight.qtype.name, "onednn_fp32_ms": onednn,
                            "gguf_ms": gguf, "gguf_int8_dot_ms": gguf_int8, "w8a8_ms": w8a8,
                            "torch_int_mm_ms": int_mm,
                            "fp32_bytes": dense.numel() * 4, "gguf_bytes": weight.nbytes,
                            "int8_bytes": dense.numel() + 4 * dense.shape[0]})
            print(f"{name} {tuple(dense.shape)} rows={rows}: oneDNN fp32 {onednn:.3f} ms, "
                  f"{weight.qtype.name} kernel {gguf:.3f} ms (int8 dot {gguf_int8:.3f} ms), "
                  f"W8A8 kernel {w8a8:.3f} ms, "
                  f"torch._int_mm {int_mm:.3f} ms", flush=True)
    return results


def decode_figures(llm: LLM, batch_size: int, output_len: int, repeats: int) -> dict:
    """Median of `repeats` runs of batch_size 4-token prompts generating output_len each."""
    prompts = [[1, 100 + i, 200 + i, 300 + i] for i in range(batch_size)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds.append(time.perf_counter() - started)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    elapsed = sorted(seconds)[repeats // 2]
    return {"batch_size": batch_size, "output_tokens": tokens, "median_seconds": elapsed,
            "repeats": repeats, "output_tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("docs/results/quantized_linear.json"))
    parser.add_argument("--w8a8-dir", type=Path, default=None,
                        help="W8A8 checkpoint of the model (written there if missing; "
                        "default: a new temporary folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "model": MODEL,
              "torch": torch.__version__, "gemm": [], "decode": []}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    float_llm, quantized_llm = load(None, max(batch_sizes)), load("gguf", max(batch_sizes))
    result["w8a8_kernel_path"] = int8_linear.kernel_path()
    result["gemm"] = gemm_figures(float_llm, quantized_llm,
                                  [int(r) for r in args.rows.split(",")], args.reps)
    w8a8_dir = args.w8a8_dir or Path(tempfile.mkdtemp(prefix="fleetlm-w8a8-"))
    if not (w8a8_dir / "config.json").exists():
        quantize_checkpoint(MODEL, w8a8_dir, progress=False)
    w8a8_llm = load(None, max(batch_sizes), model=str(w8a8_dir))
    for label, llm in (("float32", float_llm), ("gguf", quantized_llm), ("w8a8", w8a8_llm)):
        for batch_size in batch_sizes:
            figures = decode_figures(llm, batch_size, args.output_len, args.repeats)
            figures.update(weights=label, weight_bytes_per_step=bytes_per_step(llm))
            result["decode"].append(figures)
            print(f"{label} batch {batch_size}: {figures['output_tokens_per_s']:.1f} tok/s, "
                  f"{figures['weight_bytes_per_step'] / 1e6:.0f} MB of weights per step",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
