"""The GEMM chain of SmolLM2-135M (its 120 linear layers, then the lm_head apart; random fp32
weights) through `F.linear` (MKL for fp32; oneDNN on the plain weight for bf16), through oneDNN
with weights prepacked once for PACK_ROWS_HINT rows (as vLLM's CPU build does, and fleetlm's
`PackedLinear` beyond one bf16 row) and, for bf16, through fleetlm's GEMV kernel
(`fleetlm.kernels.bf16_gemv`, which fleetlm runs at one row) and its small-batch GEMM
(`fleetlm.kernels.bf16_gemm`, weights packed by k pairs; AVX512-BF16 without AMX only), each
timed here at every count, median of 7 timings per row count; `--bf16` for bf16 weights and
inputs:

    .venv/bin/python benchmarks/gemm_backends.py [--bf16] 1 5 8 32 256
"""

from __future__ import annotations

import sys
import time

import torch

from fleetlm.kernels import bf16_gemm, bf16_gemv
from fleetlm.kernels.cpu_linear import PACK_ROWS_HINT, packed_dtypes

F = torch.nn.functional
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN),
          (HIDDEN, INTERMEDIATE)] * LAYERS + [(VOCAB, HIDDEN)]


def median_ms(fn, rows: int, dtype: torch.dtype, reps: int = 7) -> float:
    inputs = {k: torch.randn(rows, k, dtype=dtype) for k in (HIDDEN, INTERMEDIATE)}
    fn(inputs)
    fn(inputs)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2] * 1e3


def main(batch_sizes: list[int], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(n, k, dtype=dtype) for n, k in SHAPES]
    backends = {"F.linear": lambda x, i: F.linear(x, weights[i])}
    if dtype in packed_dtypes():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in weights]
        backends["oneDNN prepacked"] = lambda x, i: torch.ops.mkldnn._linear_pointwise(
            x, packed[i], None, "none", [], "")
    if dtype == torch.bfloat16 and bf16_gemv.is_available():
        backends["fleetlm bf16 GEMV"] = lambda x, i: bf16_gemv.gemv(x, weights[i])
    if dtype == torch.bfloat16 and bf16_gemm.is_available():
        gemm_packed = [bf16_gemm.pack(w) for w in weights]
        backends["fleetlm bf16 GEMM"] = lambda x, i: bf16_gemm.gemm(x, gemm_packed[i])

    def chain(backend, indices):
        def run(inputs):
            for i in indices:
                backend(inputs[weights[i].shape[1]], i)
        return run

    layers, lm_head = range(len(weights) - 1), [len(weights) - 1]
    for rows in batch_sizes:
        with torch.inference_mode():
            x = torch.randn(rows, HIDDEN, dtype=dtype)
            want = F.linear(x.float(), weights[0].float())
            parts = []
            for name, backend in backends.items():
                diff = (backend(x, 0).float() - want).abs().max().item()
                parts.append(f"{name} {median_ms(chain(backend, layers), rows, dtype):.2f} + "
                             f"{median_ms(chain(backend, lm_head), rows, dtype):.2f} ms "
                             f"(max abs diff from fp32 {diff:.1e})")
        print(f"{dtype} rows={rows}, 120 layers + lm_head: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    dtype = torch.bfloat16 if "--bf16" in args else torch.float32
    main([int(a) for a in args if a != "--bf16"] or [1, 5, 8, 32, 256], dtype)
