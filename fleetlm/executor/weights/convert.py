"""GGUF file -> Hugging Face model folder, through transformers' own GGUF support.

transformers dequantizes the tensors, maps llama.cpp names to HF names and reverses the q/k
row permutation llama.cpp applies to Llama-family attention; it also rebuilds the config and
the tokenizer (with the chat template) from the GGUF metadata. We only save the results.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

# Bump when the output of convert_gguf changes, so old cache entries are not reused.
CONVERTER_VERSION = 3
WEIGHTS_FILE = "model.safetensors"
# float32 holds every value of a dequantized GGUF tensor exactly (F16 and BF16 tensors too),
# so a float32 model runs the file's own weights; a bf16 model rounds them once, on load, as
# it did when the folder itself was saved in bf16 (which made float32 inference differ from
# transformers reading the GGUF file on 3 of 8 prompts).
SAVED_DTYPE = torch.float32

logger = logging.getLogger("fleetlm.weights")
_GGUF_PATCH_LOCK = threading.Lock()


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, generation_config.json, tokenizer files (chat template included) and
    `model.safetensors` (float32, HF tensor names) for the GGUF file into `out_dir`."""
    logger.info("Converting GGUF %s into %s", gguf_path, out_dir)
    with gguf_parsed_once():
        config = _load_config(gguf_path)
        tensors = _load_tensors(gguf_path, config)
        tokenizer = _load_tokenizer(gguf_path, config)
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("Converted %d tensors from %s", len(tensors), gguf_path.name)


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within: each GGUF file's metadata is parsed once, and gguf's tensor-name table built
    once per architecture and depth.

    transformers parses a file's metadata (the built-in model's vocabulary is half a million
    fields) anew for the config, the tokenizer and the tensors, and builds the name table
    anew for every module of the model: about four fifths of a conversion's time. Both are
    functions of their arguments only (the reader maps the file read-only), so they are
    remembered here; gguf's module attributes are restored on exit. Threads of one process
    take turns through it."""
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], gguf.GGUFReader] = {}

    def reader(path, mode: str = "r") -> gguf.GGUFReader:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    with _GGUF_PATCH_LOCK:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _load_tokenizer(gguf_path: Path, config):
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # GGUF carries no tokenizer length limit; the model's context length is the real one.
    tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


def _load_config(gguf_path: Path):
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The saved weights are dequantized: the folder must not claim GGUF quantization.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = SAVED_DTYPE
    return config


def meta_model(config):
    """transformers maps GGUF names onto the parameter names of a model instance; a model on
    the meta device gives those names without allocating memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    return model


def _load_tensors(gguf_path: Path, config) -> dict[str, torch.Tensor]:
    model = meta_model(config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    tensors = {name: t.to(SAVED_DTYPE).contiguous() for name, t in parsed["tensors"].items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    _check_complete(tensors, model, config, gguf_path)
    return tensors


def _check_complete(tensors: dict[str, torch.Tensor], model, config, gguf_path: Path) -> None:
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{gguf_path}: GGUF lacks tensors the model needs: {missing[:8]}")
