"""FP8 W8A8 linear layers: compressed-tensors' `float-quantized` scheme (what LLM Compressor's
`FP8_DYNAMIC` preset writes, and `fleetlm quantize --scheme FP8_DYNAMIC`), a GPU scheme.

Weights are float8 e4m3 with one scale per output row (`max|w| / 448`); activations are
quantized at run time, one scale per row (token): `scale = max|x| / 448`, `q = x / scale` as
float8 e4m3 (round to nearest). On CUDA the product is `torch._scaled_mm` with row-wise
scales, which runs on Hopper's FP8 tensor cores (CUTLASS, through PyTorch) with fp32
accumulation: fp8 operands, one `y = (q x_scale)(W w_scale)^T` in one call, bf16 out (the only
row-wise output type on CUDA). A decode step reads one byte per weight.

On CPUs the same quantized operands are dequantized and multiplied in fp32, slowly (a
1536 x 576 layer at one row: about 3 ms against 0.1 ms in fp32 on the 2-core EPYC of
docs/benchmarks.md; torch's CPU `_scaled_mm` is no faster): there FP8 checkpoints run so they
can be checked; W8A8 INT8 (`int8_linear`) is the CPU scheme.
"""

from __future__ import annotations

import torch

from fleetlm.kernels.int8_linear import Int8Matrix, Int8Weight, _read

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row gets this scale, not a division by zero


# ---- references -------------------------------------------------------------------------------
def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row float8 of `x` (m, k): (q float8 e4m3, scale fp32 (m, 1))."""
    scale = (x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """fp32 `x` (m, k) quantized per row, times float8 `weight` (n, k) with fp32 scales (n,):
    the dequantized operands multiplied in `dtype`, returned in fp32."""
    q, x_scale = quantize_rows_reference(x)
    y = (q.to(dtype) * x_scale.to(dtype)) @ (weight.to(dtype) * weight_scale.to(dtype)[:, None]).T
    return (y if bias is None else y + bias.to(dtype)).float()


# ---- the product ------------------------------------------------------------------------------
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x` (m, k) of any float dtype quantized per row, times float8 `weight` (n, k) with fp32
    `weight_scale` (n,), plus `bias`: on CUDA one `torch._scaled_mm` (bf16 out, the row-wise
    path's only type); on CPUs the dequantized operands in fp32 (torch's CPU `_scaled_mm`
    takes row-wise scales only from 2.13 on, and is slower than this)."""
    if x.device.type == "cpu":
        return linear_reference(x, weight, weight_scale, bias, dtype=torch.float32)
    q, x_scale = quantize_rows_reference(x)
    y = torch._scaled_mm(q, weight.T, scale_a=x_scale, scale_b=weight_scale[None, :],
                         out_dtype=torch.bfloat16)
    return y if bias is None else y + bias.to(y.dtype)


# ---- checkpoint tensors and layer weights ---------------------------------------------------
class Fp8Weight(Int8Weight):
    """A checkpoint matrix of float8 e4m3 values with one scale per row; lazy and narrowed
    like `Int8Weight`."""

    __slots__ = ()

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8 data, fp32 scales of shape (rows,)), read from the file if lazy."""
        data = _read(self.data)
        if data.dtype != FP8:
            raise ValueError(f"an FP8 weight holds {data.dtype} values, not {FP8}")
        return data.contiguous(), _read(self.scale).float().reshape(-1).contiguous()


class Fp8Matrix(Int8Matrix):
    """A layer's FP8 weight of `shape` on `device`, filled by row ranges like `Int8Matrix` (q,
    k and v, or gate and up, go into one matrix, so a fused projection is one product)."""

    DTYPE = FP8

    def __init__(self, shape: tuple[int, int], device: torch.device | str = "cpu") -> None:
        if shape[1] % 16 or shape[0] % 16:
            raise ValueError(f"an FP8 matrix needs both sides divisible by 16 (the FP8 GEMM's "
                             f"alignment); got {tuple(shape)}")
        super().__init__(shape, device)

    def _multiply(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(rows, self.data, self.scale, bias)
