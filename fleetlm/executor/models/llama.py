"""The Llama family: Llama 2/3, Mistral, SmolLM, Qwen2 (qkv bias) and Qwen3 (q/k norm).

One implementation; the differences are three switches read from the Hugging Face config.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fleetlm.executor.attention import AttentionMetadata, PagedAttention
from fleetlm.executor.config import ParallelConfig
from fleetlm.executor.models.ops import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary
from fleetlm.kernels import decode_stack
from fleetlm.kernels.gguf_linear import QuantizedMatrix
from fleetlm.parallel.group import ParallelGroup
from fleetlm.parallel.layers import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_replicated,
)
from fleetlm.parallel.pipeline import stage_layer_range
from fleetlm.parallel.state import SINGLE_PROCESS_GROUPS, ProcessGroups

KVCache = tuple[torch.Tensor, torch.Tensor]

# checkpoint name fragment -> (our fused parameter, shard id)
_STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def _stacked_target(name: str) -> tuple[str, object]:
    """q/k/v into qkv_proj, gate/up into gate_up_proj, with the shard id; others as they are."""
    for fragment, (fused, shard) in _STACKED_PARAMS.items():
        if fragment in name:
            return name.replace(fragment, fused), shard
    return name, None


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
    """Pre-norm attention and MLP; the MLP is the model's choice (dense, or mixture of
    experts: `LlamaForCausalLM.make_mlp`)."""

    def __init__(self, hf_config, tp: ParallelGroup, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, tp)
        self.mlp = mlp
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


class LlamaForCausalLM(nn.Module):
    """forward() returns final hidden states for every token; compute_logits() projects the
    rows the sampler needs, so prefill tokens never pay for the vocabulary projection.

    Under pipeline parallelism a stage holds only its layers (`layers` is keyed by the global
    layer index, so parameter names stay the checkpoint's): the first stage embeds, the last
    normalises and projects logits, and the others take and return (hidden, residual).
    """

    def __init__(self, hf_config, groups: ProcessGroups = SINGLE_PROCESS_GROUPS,
                 parallel: ParallelConfig | None = None) -> None:
        super().__init__()
        self.hf_config = hf_config
        parallel = parallel or ParallelConfig()
        tp, pp = groups.tp, groups.pp
        self.tp_size = tp.world_size
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.layer_range = stage_layer_range(hf_config.num_hidden_layers, pp,
                                             parallel.pipeline_layer_partition)
        self.rotary = RotaryEmbedding(hf_config, head_dim_of(hf_config),
                                      hf_config.max_position_embeddings)
        if self.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(
                hf_config.vocab_size, hf_config.hidden_size, tp)
        self.layers = nn.ModuleDict({
            str(i): LlamaDecoderLayer(hf_config, tp, self.make_mlp(hf_config, i, groups, parallel))
            for i in self.layer_range})
        self.is_tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self._native_stack: decode_stack.DecodeStack | None = None
        self._is_stack_made = False  # made at the first decode step, after loading
        if self.is_last_stage:
            self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
            self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, tp)
            if self.is_tied and self.is_first_stage:
                self.lm_head.weight = self.embed_tokens.weight

    def make_mlp(self, hf_config, layer_index: int, groups: ProcessGroups,
                 parallel: ParallelConfig) -> nn.Module:
        """The MLP of layer `layer_index` (subclasses swap in other kinds)."""
        return GatedMLP(hf_config.hidden_size, hf_config.intermediate_size, groups.tp)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The first stage starts from `input_ids`, the others from `intermediate`, the
        previous stage's (hidden, residual). The last stage returns the normalised hidden
        states, the others their (hidden, residual)."""
        rows = input_ids.shape[0] if self.is_first_stage else intermediate[0].shape[0]
        dtype = self.embed_tokens.weight.dtype if self.is_first_stage else intermediate[0].dtype
        stack = self._decode_stack(rows, dtype, kv_caches, meta)
        if stack is not None and stack.ends is not None:  # the whole step in one call
            return stack.run_model(input_ids, positions, kv_caches, meta.slot_mapping,
                                   meta.decode_seq_lens, meta.decode_block_tables)
        if self.is_first_stage:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate
        cos_sin = self.rotary.cos_sin(positions)
        if stack is not None:
            hidden, residual = stack.run(hidden, residual, *cos_sin, kv_caches, meta.slot_mapping,
                                         meta.decode_seq_lens, meta.decode_block_tables)
        else:
            for layer, kv_cache in zip(self.layers.values(), kv_caches):
                hidden, residual = layer(cos_sin, hidden, residual, kv_cache, meta)
        if not self.is_last_stage:
            return hidden, residual
        hidden, _ = self.norm.add_and_norm(hidden, residual)
        return hidden

    def _decode_stack(self, rows: int, dtype: torch.dtype, kv_caches, meta: AttentionMetadata):
        """The native stack of this model's layers (`decode_stack`), where this step is
        `rows` decode rows only (activations in `dtype`) and both qualify; else None, and the
        layer loop runs."""
        if meta.num_prefill_tokens or meta.num_decode_tokens != rows \
                or not kv_caches or not decode_stack.enabled():
            return None
        if not self._is_stack_made:
            self._native_stack, self._is_stack_made = self._make_decode_stack(), True
        stack = self._native_stack
        return stack if stack is not None and stack.accepts(rows, dtype, kv_caches) else None

    def _make_decode_stack(self) -> decode_stack.DecodeStack | None:
        """The layers as a `DecodeStack` (built once, after loading), or None where a layer
        is not plain Llama with whole GGUF matrices."""
        if self.tp_size != 1 or not self.layers:
            return None
        specs = []
        for layer in self.layers.values():
            attn, mlp = layer.self_attn, layer.mlp
            if type(mlp) is not GatedMLP or attn.has_qk_norm or attn.qkv_proj.bias is not None \
                    or attn.o_proj.bias is not None:
                return None
            matrices = [getattr(linear.weight, "quantized", None) for linear in (
                attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if not all(isinstance(m, QuantizedMatrix) and m.whole is not None for m in matrices):
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            specs.append(decode_stack.LayerSpec(*(norm.detach() for norm in norms),
                                                *(m.whole for m in matrices)))
        first = next(iter(self.layers.values()))
        eps = {norm.eps for layer in self.layers.values()
               for norm in (layer.input_layernorm, layer.post_attention_layernorm)}
        if len(eps) != 1:
            return None
        return decode_stack.DecodeStack.make(specs, first.self_attn.num_heads,
                                             first.self_attn.num_kv_heads,
                                             first.self_attn.head_dim, eps.pop(),
                                             self._decode_ends())

    def _decode_ends(self) -> decode_stack.EndsSpec | None:
        """The embedding, rotary tables and final norm for the stack to run a whole decode
        step, where this stage is the whole model and its embedding is a GGUF matrix."""
        if not (self.is_first_stage and self.is_last_stage):
            return None
        embedding = getattr(self.embed_tokens.weight, "quantized", None)
        if not isinstance(embedding, QuantizedMatrix) or embedding.whole is None:
            return None
        head = getattr(self.lm_head.weight, "quantized", None)
        if not isinstance(head, QuantizedMatrix) or head.whole is None \
                or type(self).compute_logits is not LlamaForCausalLM.compute_logits:
            head = None  # the logits are not the head's product alone (or not one GGUF matrix)
        return decode_stack.EndsSpec(embedding.whole, self.rotary.cos, self.rotary.sin,
                                     self.norm.weight.detach(), self.norm.eps,
                                     None if head is None else head.whole,
                                     self.lm_head.vocab_size)

    def decode_argmax(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      kv_caches: list[KVCache], meta: AttentionMetadata) -> list[int] | None:
        """Each row's greedy token (the argmax of `compute_logits` of `forward`), in one
        native call where this step is decode rows only and the stack holds the whole model
        and its LM head (`DecodeStack.run_model_argmax`); else None, and nothing ran."""
        if not (self.is_first_stage and self.is_last_stage):
            return None
        stack = self._decode_stack(input_ids.shape[0], self.embed_tokens.weight.dtype,
                                   kv_caches, meta)
        if stack is None or not stack.has_head:
            return None
        return stack.run_model_argmax(input_ids, positions, kv_caches, meta.slot_mapping,
                                      meta.decode_seq_lens, meta.decode_block_tables)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into our parameters; returns the names
        of the parameters that were loaded, so callers can check nothing is missing.

        Tensors of other pipeline stages are skipped unread; each parameter's loader reads
        only this rank's shard."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = self._parameter_name(name.removeprefix("model."))
            if name is None:
                continue
            name, shard_id = self.checkpoint_target(name) or _stacked_target(name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in the model")
            param = params[name]
            getattr(param, "weight_loader", load_replicated)(param, tensor, shard_id)
            loaded.add(name)
        if self.is_tied and self.is_first_stage and self.is_last_stage:
            loaded.add("lm_head.weight")
        return loaded

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """(parameter, shard id) for checkpoint tensors a subclass stacks its own way."""
        return None

    def _parameter_name(self, name: str) -> str | None:
        """Where checkpoint tensor `name` goes on this stage; None if this stage lacks it."""
        if "rotary_emb.inv_freq" in name or (self.is_tied and name == "lm_head.weight"):
            return None
        if name.startswith("layers."):
            return name if int(name.split(".", 2)[1]) in self.layer_range else None
        if name.startswith("embed_tokens."):
            if self.is_first_stage:
                return name
            # A tied LM head on a later stage loads the embedding itself.
            return "lm_head.weight" if self.is_tied and self.is_last_stage else None
        return name if self.is_last_stage else None
