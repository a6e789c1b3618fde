"""Mixture-of-experts models: Qwen3-MoE, Qwen2-MoE (with its shared expert) and Mixtral.

They are the Llama decoder with a sparse MoE block as the MLP of their MoE layers
(`LlamaForCausalLM.make_mlp`); attention, norms, embeddings and pipeline stages are the
Llama family's. The block routes each token to `top_k` experts (softmax, top-k, renormalised
as the config says) and runs them with the fused-experts operation (`fleetlm.kernels.moe`).

Parallelism over the TP group of the stage:
- without expert parallelism, every rank holds every expert's slice of the intermediate
  dimension (gate/up rows, down columns), like a dense MLP, and the partial outputs are
  all-reduced;
- with `enable_expert_parallel`, the TP ranks form the EP group and each holds whole experts
  (`ExpertPlacement`), loading only those; tokens reach them by all-reduce or all-to-all
  (`fleetlm.parallel.experts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.executor.config import ParallelConfig
from fleetlm.executor.models.llama import LlamaForCausalLM
from fleetlm.executor.models.ops import GatedMLP
from fleetlm.kernels.cpu_linear import PackedLinear
from fleetlm.kernels.moe import FusedExperts, select_experts
from fleetlm.parallel import experts as ep
from fleetlm.parallel.group import ParallelGroup
from fleetlm.parallel.layers import _divide
from fleetlm.parallel.state import ProcessGroups

# checkpoint name inside an expert -> (our stacked parameter, which part of it)
_EXPERT_TENSORS = {
    "gate_proj": ("w13", 0), "w1": ("w13", 0),  # Qwen names, Mixtral names
    "up_proj": ("w13", 1), "w3": ("w13", 1),
    "down_proj": ("w2", None), "w2": ("w2", None),
}


class FusedMoE(nn.Module):
    """The experts of one layer, stacked: `w13 [local experts, 2 * intermediate, hidden]`,
    `w2 [local experts, hidden, intermediate]` (this rank's experts, or this rank's slice of
    every expert). forward(x, router_logits) returns the routed experts' weighted sum, already
    reduced over the group."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, tp: ParallelGroup, parallel: ParallelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.group = tp
        self.use_ep = parallel.enable_expert_parallel and tp.world_size > 1
        self.all2all_backend = parallel.all2all_backend
        if self.use_ep:
            self.placement = ep.ExpertPlacement(num_experts, tp.world_size,
                                                parallel.expert_placement_strategy)
            self.global_ids = self.placement.local_experts(tp.rank)
            self.register_buffer("expert_map", self.placement.expert_map(tp.rank),
                                 persistent=False)
            intermediate = intermediate_size
        else:
            self.global_ids = list(range(num_experts))
            self.expert_map = None
            intermediate = _divide(intermediate_size, tp.world_size, "moe_intermediate_size")
        self.intermediate = intermediate
        num_local = len(self.global_ids)
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, intermediate),
                               requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader
        self.experts = FusedExperts(num_local)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id) -> None:
        """`shard_id` is (global expert, gate 0 / up 1 / None for down). Experts of other EP
        ranks are skipped unread; without EP each rank reads its slice of the intermediate."""
        expert, part = shard_id
        if self.expert_map is not None:
            local = int(self.expert_map[expert])
            if local < 0:
                return
            start = 0
        else:
            local, start = expert, self.group.rank * self.intermediate
        n = self.intermediate
        if part is None:  # down_proj [hidden, intermediate]: columns
            target, source = param.detach()[local], loaded.narrow(1, start, n)
        else:  # gate or up [intermediate, hidden]: rows
            target = param.detach()[local].narrow(0, part * n, n)
            source = loaded.narrow(0, start, n)
        if tuple(target.shape) != tuple(source.shape):
            raise ValueError(f"expert {expert}: checkpoint shape {tuple(source.shape)} != "
                             f"{tuple(target.shape)}")
        target.copy_(source)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        if not self.use_ep:
            return self.group.all_reduce(
                self.experts(x, self.w13, self.w2, topk_weights, topk_ids))
        if self.all2all_backend == "all_to_all":
            return ep.exchange_all_to_all(self.group, self.experts, x, self.w13, self.w2,
                                          topk_weights, topk_ids, self.placement)
        return ep.combine_all_reduce(self.group, self.experts, x, self.w13, self.w2,
                                     topk_weights, topk_ids, self.expert_map)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated), the experts and, for Qwen2-MoE, a shared expert whose
    output is scaled by sigmoid(`shared_expert_gate`)."""

    def __init__(self, hf_config, tp: ParallelGroup, parallel: ParallelConfig) -> None:
        super().__init__()
        hidden = hf_config.hidden_size
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"MoE experts with {hf_config.hidden_act!r}: only silu is supported")
        num_experts = _num_experts(hf_config)
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.gate_linear = PackedLinear()
        # Mixtral always renormalises the top-k weights; the Qwen models say so in the config.
        renormalize = getattr(hf_config, "norm_topk_prob", True)
        self.experts = FusedMoE(num_experts, hf_config.num_experts_per_tok, hidden,
                                hf_config.moe_intermediate_size
                                if hasattr(hf_config, "moe_intermediate_size")
                                else hf_config.intermediate_size,
                                renormalize, tp, parallel)
        shared = getattr(hf_config, "shared_expert_intermediate_size", 0)
        self.shared_expert = GatedMLP(hidden, shared, tp) if shared else None
        if shared:
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
            self.shared_expert_gate.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate_linear(x, self.gate.weight))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * shared
        return out


class MoEForCausalLM(LlamaForCausalLM):
    """Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM."""

    def make_mlp(self, hf_config, layer_index: int, groups: ProcessGroups,
                 parallel: ParallelConfig) -> nn.Module:
        if not is_moe_layer(hf_config, layer_index):
            return super().make_mlp(hf_config, layer_index, groups, parallel)
        return SparseMoeBlock(hf_config, groups.tp, parallel)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """Per-expert checkpoint tensors (`mlp.experts.3.gate_proj.weight`, Mixtral's
        `block_sparse_moe.experts.3.w1.weight`) go to the layer's stacked parameters; Mixtral's
        router (`block_sparse_moe.gate`) is our `mlp.gate`."""
        if ".block_sparse_moe." in name:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            if ".mlp.experts." not in name:
                return name, None
        if ".mlp.experts." not in name:
            return None
        prefix, rest = name.split(".mlp.experts.", 1)
        expert, tensor, _ = rest.split(".", 2)
        param, part = _EXPERT_TENSORS[tensor]
        return f"{prefix}.mlp.experts.{param}", (int(expert), part)


def _num_experts(hf_config) -> int:
    return getattr(hf_config, "num_experts", None) or hf_config.num_local_experts


def is_moe_layer(hf_config, layer_index: int) -> bool:
    """Mixtral: every layer. Qwen MoE: every `decoder_sparse_step`-th layer not listed in
    `mlp_only_layers`."""
    if layer_index in (getattr(hf_config, "mlp_only_layers", None) or []):
        return False
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return (layer_index + 1) % step == 0


def is_moe_model(hf_config) -> bool:
    return bool(getattr(hf_config, "num_experts", None)
                or getattr(hf_config, "num_local_experts", None))
