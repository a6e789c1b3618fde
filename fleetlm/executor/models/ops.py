"""Small model building blocks shared by the model families: norms, rotary embedding, MLP."""

from __future__ import annotations

import torch
from torch import nn

from fleetlm.kernels import fused_ops
from fleetlm.parallel.group import SINGLE_PROCESS, ParallelGroup
from fleetlm.parallel.layers import MergedColumnParallelLinear, RowParallelLinear


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_ops.add_rms_norm(x, None, self.weight, self.eps)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm block's residual step, in one
        pass on CPUs (the sum is written into x)."""
        return fused_ops.add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with cos/sin precomputed for every position.

    The inverse frequencies come from transformers' own RoPE functions, so every scaling type a
    Hugging Face config names (linear, dynamic, yarn, llama3, longrope) is computed the same way.
    """

    def __init__(self, hf_config, head_dim: int, max_position: int) -> None:
        super().__init__()
        inv_freq, scaling = _rope_inv_freq(hf_config, head_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Looked up once per step and shared by every layer: [tokens, 1, head_dim / 2]."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate [tokens, heads, head_dim] (q and k heads together, in one pass) in place: x may
    be the q and k heads of a fused qkv projection's output."""
    return fused_ops.rotary_(x, *cos_sin)


def _rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r} in the model config")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up in one matrix."""

    def __init__(self, hidden_size: int, intermediate_size: int,
                 tp: ParallelGroup = SINGLE_PROCESS) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], tp=tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused_ops.silu_mul(self.gate_up_proj(x)))
