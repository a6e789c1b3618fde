"""The real built-in model: converted once per module (tens of seconds) through the default
cache location, then checked for config, tokenizer, tensor names, cache reuse and a greedy answer
that is only right when llama.cpp's q/k permutation was undone."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from fleetlm.executor.weights import (
    CACHE_DIR_ENV,
    iterate_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)

pytestmark = pytest.mark.slow

BUILTIN = "smollm2-135m-instruct"
NUM_LAYERS = 30
PER_LAYER = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
             "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
QUESTION = "What is the capital of France? Answer in one sentence."
NUM_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """$FLEETLM_CACHE_DIR for this module: the default-cache path, never the user's ~/.cache."""
    root = tmp_path_factory.mktemp("fleetlm-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def model_dir(cache_root):
    return resolve_model(BUILTIN)


def test_lands_in_the_default_cache(model_dir, cache_root):
    assert model_dir.parent == cache_root / "models"
    assert model_dir.name.startswith(f"{BUILTIN}-")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in model_dir.iterdir()}


def test_config(model_dir):
    config = load_hf_config(model_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == NUM_LAYERS
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings is True
    assert getattr(config, "quantization_config", None) is None


def test_tokenizer_has_the_chatml_template(model_dir):
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")


def test_tensors_have_hf_names_and_no_tied_lm_head(model_dir):
    shapes = {name: tuple(t.shape) for name, t in iterate_weights(model_dir, progress=False)}
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(NUM_LAYERS) for part in PER_LAYER}
    assert set(shapes) == expected
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (3 * 64, 576)


def test_second_resolve_hits_the_cache(model_dir, caplog):
    before = model_dir.stat()
    with caplog.at_level(logging.INFO, logger="fleetlm.weights"):
        again = resolve_model(BUILTIN)
    assert again == model_dir
    after = model_dir.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    messages = [r.getMessage() for r in caplog.records]
    assert any("Using cached model" in m for m in messages)
    assert not any("Converting" in m for m in messages)


def test_greedy_answer_names_paris(model_dir):
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NUM_NEW_TOKENS, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
