"""A GGUF file's own tensors under Hugging Face names, matrices kept in their quantized blocks
(`quantization: gguf`): the model's linear layers multiply those blocks
(`fleetlm.kernels.gguf_linear`) instead of a dequantized float copy.

transformers' GGUF support gives the name mapping and llama.cpp's q/k row permutation, as
for the float conversion (`convert.py`); a row permutation moves whole rows of blocks, so it
applies to the quantized bytes as it does to floats. Norms and other vectors are dequantized
(they are F32 in the files llama.cpp writes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import (
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    dequantize,
    get_tensor_name_map,
)
from tqdm.auto import tqdm
from transformers import PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    LlamaTensorProcessor,
    TensorProcessor,
    read_field,
)

from fleetlm.executor.weights.builtin import BUILTIN_MODELS, builtin_gguf_path
from fleetlm.executor.weights.compressed import (
    QUANT_METHOD,
    check_w8a8,
    checkpoint_quantization,
    iterate_compressed_weights,
    quantization_config,
)
from fleetlm.executor.weights.convert import meta_model
from fleetlm.executor.weights.loader import ReadCounter, iterate_weights
from fleetlm.kernels.gguf_linear import TYPES, GGUFWeight

logger = logging.getLogger("fleetlm.weights")

# Tensor processors that at most permute rows (the others reshape or split tensors).
ROW_PROCESSORS = (TensorProcessor, LlamaTensorProcessor)
FLOAT_VIEWS = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def iterate_checkpoint(name_or_path: str, quantization: str | None, model_dir: Path,
                       hf_config: PretrainedConfig, progress: bool = True,
                       counter: ReadCounter | None = None
                       ) -> Iterator[tuple[str, GGUFWeight | torch.Tensor]]:
    """The weights a model loads: with `quantization` gguf, the GGUF file's own tensors (the
    built-in model's, or the .gguf file named); else the model folder's (`iterate_weights`),
    int8 or float8 matrices kept as they are when its config declares compressed-tensors W8A8."""
    if quantization != "gguf":
        declared = checkpoint_quantization(hf_config)
        if quantization is not None and declared != quantization:
            raise ValueError(f"quantization {quantization} needs a checkpoint quantized so; "
                             f"{model_dir} has no such quantization_config in config.json")
        if declared == QUANT_METHOD:
            return iterate_compressed_weights(
                model_dir, progress=progress, counter=counter,
                scheme=check_w8a8(quantization_config(hf_config)))
        return iterate_weights(model_dir, progress=progress, counter=counter)
    if name_or_path in BUILTIN_MODELS:
        gguf_path = builtin_gguf_path(name_or_path)
    else:
        gguf_path = Path(name_or_path).expanduser()
    return iterate_gguf_weights(gguf_path, hf_config, progress=progress, counter=counter)


def iterate_gguf_weights(gguf_path: Path, hf_config: PretrainedConfig, progress: bool = True,
                         counter: ReadCounter | None = None
                         ) -> Iterator[tuple[str, GGUFWeight | torch.Tensor]]:
    """Yield (HF tensor name, tensor) for the GGUF file's tensors: a `GGUFWeight` for each
    matrix of a supported type (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, F32), fp32 tensors for the
    rest. `hf_config` is the file's config (the converted folder's). ValueError for an
    architecture whose tensors transformers reshapes (MoE files) or a matrix of another type.
    """
    reader = GGUFReader(gguf_path)
    architecture = read_field(reader, "general.architecture")[0]
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class not in ROW_PROCESSORS:
        raise ValueError(f"{gguf_path.name}: quantization gguf does not support the "
                         f"{architecture} architecture (its tensors are reshaped on load); "
                         f"leave quantization unset to run it dequantized")
    processor = processor_class(config={
        "num_attention_heads": hf_config.num_attention_heads,
        "num_key_value_heads": hf_config.num_key_value_heads})
    names = _hf_names(architecture, hf_config)
    counter = counter or ReadCounter()
    logger.info("Loading %d GGUF tensors, quantized ones as they are, from %s",
                len(reader.tensors), gguf_path)
    for tensor in tqdm(reader.tensors, desc="Loading GGUF weights", unit="tensors",
                       disable=not progress):
        name = names.get(tensor.name)
        if name is None or (hf_config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        counter.num_bytes += int(tensor.n_bytes)
        yield name, _tensor(tensor, processor)


def _hf_names(architecture: str, hf_config: PretrainedConfig) -> dict[str, str]:
    """GGUF tensor name -> HF name, through gguf-py's name table (what transformers'
    `get_gguf_hf_weights_map` does, without its walk over every submodule)."""
    arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == architecture)
    table = get_tensor_name_map(arch, hf_config.num_hidden_layers)
    names = {}
    for hf_name in meta_model(hf_config).state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _tensor(tensor, processor: TensorProcessor) -> GGUFWeight | torch.Tensor:
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if len(tensor.shape) != 2:
        values = processor.process(weights=dequantize(tensor.data, qtype), name=tensor.name)
        return torch.from_numpy(np.array(values.weights, dtype=np.float32, order="C"))
    if qtype not in TYPES:
        raise ValueError(f"GGUF tensor {tensor.name} is {qtype.name}; quantization gguf runs "
                         f"{', '.join(t.name for t in TYPES)}")
    blocks = np.asarray(tensor.data)
    if qtype in FLOAT_VIEWS:
        blocks = blocks.astype(FLOAT_VIEWS[qtype], copy=False).view(np.uint8)
    rows = processor.process(weights=blocks, name=tensor.name).weights
    return GGUFWeight(torch.from_numpy(np.array(rows, order="C")), qtype, int(tensor.shape[0]))
