"""Model registry: Hugging Face architecture name -> our implementation."""

from __future__ import annotations

from torch import nn

from fleetlm.executor.models.llama import LlamaForCausalLM
from fleetlm.executor.models.moe import MoEForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MoEForCausalLM,
    "Qwen2MoeForCausalLM": MoEForCausalLM,
    "Qwen3MoeForCausalLM": MoEForCausalLM,
}


def get_model_class(hf_config) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise ValueError(
        f"unsupported architecture {getattr(hf_config, 'architectures', None)}; "
        f"supported: {sorted(_REGISTRY)}")
