"""Weights and tokenizers: resolve a model name, GGUF file or folder to a Hugging Face model
folder (converting GGUF once, cached), then stream its tensors into a model (or, with
`quantization: gguf`, the GGUF file's own quantized blocks)."""

from fleetlm.executor.weights.builtin import BUILTIN_MODELS, BuiltinModel, builtin_gguf_path
from fleetlm.executor.weights.cache import CACHE_DIR_ENV, default_cache_dir
from fleetlm.executor.weights.convert import CONVERTER_VERSION, convert_gguf
from fleetlm.executor.weights.gguf_blocks import iterate_checkpoint, iterate_gguf_weights
from fleetlm.executor.weights.loader import (
    LazyTensor,
    ReadCounter,
    iterate_weights,
    load_hf_config,
    load_tokenizer,
)
from fleetlm.executor.weights.resolve import resolve_model, resolve_tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "CACHE_DIR_ENV",
    "CONVERTER_VERSION",
    "BuiltinModel",
    "LazyTensor",
    "ReadCounter",
    "builtin_gguf_path",
    "convert_gguf",
    "default_cache_dir",
    "iterate_checkpoint",
    "iterate_gguf_weights",
    "iterate_weights",
    "load_hf_config",
    "load_tokenizer",
    "resolve_model",
    "resolve_tokenizer",
]
