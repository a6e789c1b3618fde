"""The Llama family: Llama 2/3, Mistral, SmolLM, Qwen2 (qkv bias) and Qwen3 (q/k norm).

One implementation; the differences are three switches read from the Hugging Face config.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fleetlm.executor.attention import AttentionMetadata, PagedAttention
from fleetlm.executor.models.ops import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary
from fleetlm.parallel.group import SINGLE_PROCESS, ParallelGroup
from fleetlm.parallel.layers import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

KVCache = tuple[torch.Tensor, torch.Tensor]

# checkpoint name fragment -> (our fused parameter, shard id)
_STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def head_dim_of(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads)


class LlamaAttention(nn.Module):
    def __init__(self, hf_config, tp: ParallelGroup) -> None:
        super().__init__()
        head_dim = head_dim_of(hf_config)
        arch = (hf_config.architectures or [""])[0]
        qkv_bias = getattr(hf_config, "attention_bias", False) or arch.startswith("Qwen2")
        self.qkv_proj = QKVParallelLinear(
            hf_config.hidden_size, head_dim, hf_config.num_attention_heads,
            hf_config.num_key_value_heads, bias=qkv_bias, tp=tp)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(
            hf_config.num_attention_heads * head_dim, hf_config.hidden_size,
            bias=getattr(hf_config, "attention_bias", False), tp=tp)
        self.has_qk_norm = arch.startswith("Qwen3")
        if self.has_qk_norm:
            self.q_norm = RMSNorm(head_dim, hf_config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, hf_config.rms_norm_eps)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, head_dim)

    def forward(self, cos_sin, hidden, kv_cache: KVCache, meta: AttentionMetadata):
        num_heads, num_kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(hidden).view(-1, num_heads + 2 * num_kv_heads, self.head_dim)
        qk, v = qkv[:, : num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]
        if self.has_qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :num_heads]), self.k_norm(qk[:, num_heads:])), 1)
        qk = apply_rotary(qk, cos_sin)
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.view(-1, num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_config, tp: ParallelGroup) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, tp)
        self.mlp = GatedMLP(hf_config.hidden_size, hf_config.intermediate_size, tp)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, cos_sin, hidden, residual, kv_cache: KVCache, meta: AttentionMetadata):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(cos_sin, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


def _copy_whole(param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
    param.data.copy_(tensor)


class LlamaForCausalLM(nn.Module):
    """forward() returns final hidden states for every token; compute_logits() projects the
    rows the sampler needs, so prefill tokens never pay for the vocabulary projection."""

    def __init__(self, hf_config, tp: ParallelGroup = SINGLE_PROCESS,
                 max_position: int | None = None) -> None:
        super().__init__()
        self.hf_config = hf_config
        max_position = max_position or hf_config.max_position_embeddings
        self.rotary = RotaryEmbedding(hf_config, head_dim_of(hf_config), max_position)
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, tp) for _ in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, tp)
        self.is_tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.is_tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        hidden, residual = self.embed_tokens(input_ids), None
        cos_sin = self.rotary.cos_sin(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(cos_sin, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm.add_and_norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into our parameters; returns the names
        of the parameters that were loaded, so callers can check nothing is missing."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name or (self.is_tied and name == "lm_head.weight"):
                continue
            shard_id = None
            for fragment, (fused, shard) in _STACKED_PARAMS.items():
                if fragment in name:
                    name, shard_id = name.replace(fragment, fused), shard
                    break
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in the model")
            param = params[name]
            loader = getattr(param, "weight_loader", _copy_whole)
            loader(param, tensor, shard_id)
            loaded.add(name)
        if self.is_tied:
            loaded.add("lm_head.weight")
        return loaded
