"""The GEMM chain of SmolLM2-135M (every linear layer plus the lm_head, random fp32 weights)
through `F.linear` (MKL for fp32; oneDNN on the plain weight for bf16) and through fleetlm's
`PackedLinear` (oneDNN with weights prepacked once for PACK_ROWS_HINT rows, as vLLM's CPU
build does), median of 7 timings per row count; `--bf16` for bf16 weights and inputs:

    .venv/bin/python benchmarks/gemm_backends.py [--bf16] 1 5 8 32 256
"""

from __future__ import annotations

import sys
import time

import torch

from fleetlm.kernels.cpu_linear import PackedLinear

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

    def mkl(inputs):
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    linears = [PackedLinear() for _ in weights]

    def onednn(inputs):
        for w, linear in zip(weights, linears):
            linear(inputs[w.shape[1]], w)

    for rows in batch_sizes:
        x = torch.randn(rows, HIDDEN, dtype=dtype)
        with torch.inference_mode():
            diff = (linears[0](x, weights[0]) - F.linear(x, weights[0])).abs().max().item()
            print(f"{dtype} rows={rows}: F.linear {median_ms(mkl, rows, dtype):.1f} ms, oneDNN "
                  f"prepacked {median_ms(onednn, rows, dtype):.1f} ms (max abs diff {diff:.1e})",
                  flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    dtype = torch.bfloat16 if "--bf16" in args else torch.float32
    main([int(a) for a in args if a != "--bf16"] or [1, 5, 8, 32, 256], dtype)
