"""Tensor-parallel layers. Each parameter carries a `weight_loader` that takes a checkpoint
tensor and copies in this rank's shard, so the checkpoint loader stays generic.

A checkpoint tensor is a `torch.Tensor` or a lazy one (`fleetlm.executor.weights.LazyTensor`):
anything with `.shape` and `.narrow(dim, start, length)`. Loaders only ever narrow it to their
own rows or columns first, so a rank reads only its shard from a lazy file.

A quantized checkpoint matrix is such a tensor too: a GGUF one (`GGUFWeight`, `quantization:
gguf`) or a W8A8 one (`Int8Weight` or `Fp8Weight`, a compressed-tensors checkpoint). The linear
layers of a CPU model keep it quantized (a `QuantizedMatrix` of GGUF blocks, an `Int8Matrix`,
an `Fp8Matrix`; on the parameter as `param.quantized`, so a tied LM head shares it; the
embedding too for GGUF) and free the float parameter; on a GPU only FP8 stays quantized. Any
other parameter takes it dequantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.kernels.cpu_linear import PackedLinear
from fleetlm.kernels.fp8_linear import Fp8Matrix, Fp8Weight
from fleetlm.kernels.gguf_linear import GGUFWeight, QuantizedMatrix, zeros
from fleetlm.kernels.int8_linear import Int8Matrix, Int8Weight
from fleetlm.parallel.group import SINGLE_PROCESS, ParallelGroup


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the parallel size {denominator}")
    return numerator // denominator


def whole(loaded) -> torch.Tensor:
    """All of a checkpoint tensor (for parameters every rank holds in full)."""
    if isinstance(loaded, (GGUFWeight, Int8Weight)):
        return loaded.dequantize()
    return loaded if isinstance(loaded, torch.Tensor) else loaded.narrow(0, 0, loaded.shape[0])


# A quantized checkpoint matrix -> the layer weight that keeps it quantized: (its class, the
# device types it runs on).
QUANTIZED_MATRICES = {GGUFWeight: (QuantizedMatrix, ("cpu",)), Int8Weight: (Int8Matrix, ("cpu",)),
                      Fp8Weight: (Fp8Matrix, ("cpu", "cuda"))}


def _load_rows(param: nn.Parameter, shape: tuple[int, int], row: int, loaded) -> None:
    """Rows `row`.. of a weight of `shape`: GGUF blocks and int8 weights are kept (CPU
    models), FP8 weights on every device; anything else is copied into the parameter."""
    matrix_class, devices = QUANTIZED_MATRICES.get(type(loaded), (None, ()))
    if param.device.type in devices:
        if getattr(param, "quantized", None) is None:
            param.quantized = matrix_class(shape, param.device)
            param.data = torch.empty(0, dtype=param.dtype)  # never filled: free it
        param.quantized.put(row, loaded)
        return
    _copy_checked(param.detach().narrow(0, row, loaded.shape[0]), loaded)


def _linear(linear: PackedLinear, x: torch.Tensor, weight: nn.Parameter,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    quantized = getattr(weight, "quantized", None)
    return linear(x, weight, bias) if quantized is None else quantized.linear(x, bias)


def weight_bytes(param: nn.Parameter) -> int:
    """Bytes a pass over the weight reads: its quantized form, or its float elements."""
    quantized = getattr(param, "quantized", None)
    return param.numel() * param.element_size() if quantized is None else quantized.nbytes


def _copy_checked(param: nn.Parameter, loaded) -> None:
    """Copy through `param` (never `.data`), so its version counter tells `PackedLinear`."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != parameter {tuple(param.shape)}")
    param.detach().copy_(whole(loaded))


def load_replicated(param: nn.Parameter, loaded, shard_id=None) -> None:
    """The loader of parameters held whole on every rank (norms, biases of row layers)."""
    _copy_checked(param, loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; each rank holds out_features / tp rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: ParallelGroup = SINGLE_PROCESS) -> None:
        super().__init__()
        self.tp = tp
        self.out_per_rank = _divide(out_features, tp.world_size, "output features")
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.linear = PackedLinear()
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param is not self.weight:  # the bias
            n = param.shape[0]
            _copy_checked(param, loaded.narrow(0, self.tp.rank * n, n))
            return
        n = self.out_per_rank
        _load_rows(param, (n, self.in_features), 0, loaded.narrow(0, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.linear, x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked into one (gate and up projections)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 tp: ParallelGroup = SINGLE_PROCESS) -> None:
        super().__init__(in_features, sum(output_sizes), bias, tp)
        self.shard_sizes = [_divide(s, tp.world_size, "output features") for s in output_sizes]

    def _shard_range(self, shard_id) -> tuple[int, int]:
        return sum(self.shard_sizes[:shard_id]), self.shard_sizes[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        offset, size = self._shard_range(shard_id)
        self._load_shard(param, offset, loaded.narrow(0, self.tp.rank * size, size))

    def _load_shard(self, param: nn.Parameter, offset: int, shard) -> None:
        if param is self.weight:
            _load_rows(param, (self.out_per_rank, self.in_features), offset, shard)
        else:
            _copy_checked(param.detach().narrow(0, offset, shard.shape[0]), shard)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections in one matrix; heads are split over ranks (KV heads replicated
    when there are fewer of them than ranks)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: ParallelGroup = SINGLE_PROCESS) -> None:
        self.num_heads = _divide(num_heads, tp.world_size, "attention heads")
        if num_kv_heads >= tp.world_size:
            self.num_kv_heads = _divide(num_kv_heads, tp.world_size, "KV heads")
            self.kv_replicas = 1
        else:  # fewer KV heads than ranks: each KV head lives on tp / num_kv_heads ranks
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp.world_size, num_kv_heads, "ranks over KV heads")
        sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim,
                 self.num_kv_heads * head_dim]
        super().__init__(hidden_size, [s * tp.world_size for s in sizes], bias, tp)
        self.shard_sizes = sizes

    def _shard_range(self, shard_id) -> tuple[int, int]:
        return super()._shard_range("qkv".index(shard_id))

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        offset, size = self._shard_range(shard_id)
        rank = self.tp.rank if shard_id == "q" else self.tp.rank // self.kv_replicas
        self._load_shard(param, offset, loaded.narrow(0, rank * size, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial results are summed over ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: ParallelGroup = SINGLE_PROCESS) -> None:
        super().__init__()
        self.tp = tp
        self.in_per_rank = _divide(in_features, tp.world_size, "input features")
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.linear = PackedLinear()
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = load_replicated

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = self.in_per_rank
        _load_rows(param, (self.out_features, n), 0, loaded.narrow(1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(_linear(self.linear, x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; out-of-shard ids contribute zeros."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: ParallelGroup = SINGLE_PROCESS):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.world_size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        num_rows = max(0, min(self.rows_per_rank, loaded.shape[0] - self.vocab_start))
        if isinstance(loaded, GGUFWeight) and param.device.type == "cpu":
            shape = (self.rows_per_rank, self.hidden_size)
            if num_rows < self.rows_per_rank:  # past the vocabulary: zero rows
                _load_rows(param, shape, num_rows, zeros(
                    loaded.qtype, self.rows_per_rank - num_rows, self.hidden_size))
            if num_rows:
                _load_rows(param, shape, 0, loaded.narrow(0, self.vocab_start, num_rows))
            return
        param.detach().zero_()
        if num_rows:
            param.detach()[:num_rows].copy_(whole(loaded.narrow(0, self.vocab_start, num_rows)))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        quantized = getattr(self.weight, "quantized", None)
        if quantized is None:
            return F.embedding(ids, self.weight)
        return quantized.embedding(ids, self.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self._embed(input_ids)
        local = input_ids - self.vocab_start
        mask = (local < 0) | (local >= self.rows_per_rank)
        out = self._embed(local.masked_fill(mask, 0)).masked_fill(mask[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary; may share its weight with the input embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: ParallelGroup = SINGLE_PROCESS):
        super().__init__(vocab_size, hidden_size, tp)
        self.linear = PackedLinear()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather(_linear(self.linear, hidden, self.weight), dim=-1)
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]
