"""`quantization: gguf` on a tiny GGUF file written here with a mix of types: q/k Q4_0 and
v Q8_0 (one fused qkv matrix of two types), gate Q4_1 and up Q8_0, down F16, a Q8_0
embedding and an F32 LM head (untied). The same file dequantized on load is the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_weights import NUM_LAYERS, gguf_tensors, tiny_hf_tensors, write_tiny_gguf

from fleetlm import LLM, SamplingParams
from fleetlm.executor.weights import (
    iterate_gguf_weights,
    iterate_weights,
    load_hf_config,
    resolve_model,
)
from fleetlm.kernels import gguf_linear
from fleetlm.kernels.gguf_linear import GGUFWeight
from fleetlm.parallel.layers import whole

LAYER_TYPES = {"attn_q": T.Q4_0, "attn_k": T.Q4_0, "attn_v": T.Q8_0, "attn_output": T.Q4_1,
               "ffn_gate": T.Q4_1, "ffn_up": T.Q8_0, "ffn_down": T.F16}
TYPES = {"token_embd.weight": T.Q8_0, **{
    f"blk.{i}.{name}.weight": qtype for i in range(NUM_LAYERS)
    for name, qtype in LAYER_TYPES.items()}}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    path = root / "mixed.gguf"
    hf = tiny_hf_tensors(np.random.default_rng(0))
    for name, w in hf.items():  # weight-sized values, so that logits are not saturated
        hf[name] = w * 0.1 if w.ndim == 2 else w
    write_tiny_gguf(path, hf, TYPES)
    assert set(TYPES) <= set(gguf_tensors(hf))
    return path


def test_blocks_keep_their_types_and_dequantize_to_the_converted_folder(mixed_gguf):
    model_dir = resolve_model(str(mixed_gguf), cache_dir=mixed_gguf.parent / "cache")
    converted = dict(iterate_gguf_weights(mixed_gguf, load_hf_config(model_dir),
                                          progress=False))
    q = converted["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, GGUFWeight) and q.qtype == T.Q4_0
    assert converted["model.layers.1.mlp.down_proj.weight"].qtype == T.F16
    assert converted["lm_head.weight"].qtype == T.F32
    assert isinstance(converted["model.norm.weight"], torch.Tensor)
    for name, tensor in iterate_weights(model_dir, progress=False):  # q/k rows unpermuted
        assert torch.equal(whole(converted[name]), whole(tensor)), name


@pytest.mark.parametrize(("int8_dot", "tolerance"), [(False, 1e-4), (True, 2e-2)])
def test_quantized_model_follows_the_dequantized_one(mixed_gguf, monkeypatch, int8_dot,
                                                     tolerance):
    """Greedy tokens equal the dequantized model's; logprobs equal them to summation order
    with fp32 activations, and move by at most 0.02 nats (measured: 0.005) when steps under
    64 tokens round the activations to int8 per block for integer dot products."""
    monkeypatch.setattr(gguf_linear, "_INT8_DOT", int8_dot)
    common = {"dtype": "float32", "kv_cache_memory_bytes": 4 << 20, "seed": 0}
    quantized = LLM(str(mixed_gguf), quantization="gguf", **common)
    reference = LLM(str(mixed_gguf), **common)
    model = quantized.engine.executor.runner.model
    assert model.layers["0"].self_attn.qkv_proj.weight.quantized.qtypes == ["Q4_0", "Q8_0"]
    assert model.layers["0"].mlp.gate_up_proj.weight.quantized.qtypes == ["Q4_1", "Q8_0"]
    prompts = [[1, 3, 4, 5], [1, 7, 8], [2, 3, 3, 3, 6, 7, 8, 4]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    for ours, theirs in zip(quantized.generate(prompts, params),
                            reference.generate(prompts, params)):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        assert len(ours.outputs[0].logprobs) == 8
        for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs):
            assert a[0][1] == pytest.approx(b[0][1], abs=tolerance)  # sampled token's logprob
