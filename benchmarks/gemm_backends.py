"""The GEMM chain of SmolLM2-135M (every linear layer plus the lm_head, random fp32 weights)
through MKL (`F.linear`) and through fleetlm's `PackedLinear` (oneDNN with weights prepacked
once for PACK_ROWS_HINT rows, as vLLM's CPU build does), median of 7 timings per row count:

    .venv/bin/python benchmarks/gemm_backends.py 1 5 8 32 256
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


def median_ms(fn, rows: int, reps: int = 7) -> float:
    inputs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
    fn(inputs)
    fn(inputs)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2] * 1e3


def main(batch_sizes: list[int]) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for n, k in SHAPES]

    def mkl(inputs):
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    linears = [PackedLinear() for _ in weights]

    def onednn(inputs):
        for w, linear in zip(weights, linears):
            linear(inputs[w.shape[1]], w)

    for rows in batch_sizes:
        x = torch.randn(rows, HIDDEN)
        with torch.inference_mode():
            diff = (linears[0](x, weights[0]) - F.linear(x, weights[0])).abs().max().item()
            print(f"rows={rows}: MKL {median_ms(mkl, rows):.1f} ms, oneDNN prepacked "
                  f"{median_ms(onednn, rows):.1f} ms (max abs diff {diff:.1e})", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 5, 8, 32, 256])
