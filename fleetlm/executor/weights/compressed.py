"""compressed-tensors checkpoints, the format LLM Compressor (and `fleetlm quantize`) writes:
a Hugging Face folder whose config.json carries a `quantization_config` with `quant_method:
compressed-tensors`. fleetlm runs its two W8A8 schemes: W8A8 INT8 (`int-quantized`, the CPU
scheme) and FP8 W8A8 (`float-quantized`, LLM Compressor's FP8_DYNAMIC, the GPU scheme). Each
quantized linear layer's `weight` is int8 or float8 e4m3 with a `weight_scale` per output row
(symmetric), and its input activations are quantized per token at run time (dynamic,
symmetric). The matrices are yielded as they are (`Int8Weight`, `Fp8Weight`), never
dequantized, and the linear layers multiply them (`fleetlm.kernels.int8_linear`,
`fp8_linear`); layers the checkpoint left in float (`ignore`, e.g. lm_head) load as usual.

The quantization is read from the checkpoint, as vLLM does: `quantization: compressed-tensors`
in the settings only insists on it. Anything else compressed-tensors can describe (static
activation scales, zero points, groups, packed 4-bit, float8 per tensor) is refused with the
reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from fleetlm.executor.weights.loader import LazyTensor, ReadCounter, iterate_weights
from fleetlm.kernels.fp8_linear import Fp8Weight
from fleetlm.kernels.int8_linear import Int8Weight

QUANT_METHOD = "compressed-tensors"
SCALE_SUFFIX = ".weight_scale"
# Tensors of schemes fleetlm does not run; their presence means the config undersold them.
UNSUPPORTED_SUFFIXES = (".weight_zero_point", ".input_scale", ".weight_packed",
                        ".weight_g_idx", ".weight_global_scale", ".input_zero_point")
# What a group of each scheme must say (compressed-tensors' QuantizationArgs field: value).
W8A8_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
W8A8_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                    "strategy": "token"}
FP8_WEIGHTS = {**W8A8_WEIGHTS, "type": "float"}
FP8_ACTIVATIONS = {**W8A8_ACTIVATIONS, "type": "float"}


class Scheme(NamedTuple):
    name: str
    weights: dict
    activations: dict
    weight_class: type


W8A8 = Scheme("W8A8 INT8", W8A8_WEIGHTS, W8A8_ACTIVATIONS, Int8Weight)
FP8 = Scheme("FP8 W8A8", FP8_WEIGHTS, FP8_ACTIVATIONS, Fp8Weight)
# A group's format -> its scheme ("naive-quantized": the same int8 bytes as "int-quantized").
FORMATS = {"int-quantized": W8A8, "naive-quantized": W8A8, "float-quantized": FP8}


def quantization_config(hf_config: PretrainedConfig) -> dict | None:
    """The checkpoint's `quantization_config` as a dict, or None."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()


def checkpoint_quantization(hf_config: PretrainedConfig) -> str | None:
    """"compressed-tensors" when the checkpoint is a W8A8 INT8 one, None when it is not
    quantized; ValueError, with the reason, for any quantization fleetlm does not run."""
    config = quantization_config(hf_config)
    if config is None:
        return None
    method = config.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"the checkpoint's quantization {method!r} is not supported: fleetlm "
                         f"runs {QUANT_METHOD} W8A8 INT8 and FP8 checkpoints (and .gguf files)")
    check_w8a8(config)
    return QUANT_METHOD


def check_w8a8(config: dict) -> Scheme:
    """The checkpoint's scheme; ValueError unless every config group is one and the same of
    W8A8 INT8 or FP8 W8A8 (channel-wise symmetric weights, dynamic per-token symmetric
    activations) stored compressed."""
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"{QUANT_METHOD} checkpoint has quantization_status {status!r}; "
                         f"fleetlm reads compressed (int8 or float8) weights only")
    groups = config.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{QUANT_METHOD} quantization_config has no config_groups")
    schemes = {}
    for name, group in groups.items():
        group_format = group.get("format") or config.get("format")
        if group_format not in FORMATS:
            raise ValueError(f"{QUANT_METHOD} group {name}: format {group_format!r} is not "
                             f"supported; fleetlm runs {' / '.join(FORMATS)} (W8A8 INT8, FP8)")
        scheme = FORMATS[group_format]
        _check_args(name, "weights", group.get("weights"), scheme.weights, scheme.name)
        _check_args(name, "input_activations", group.get("input_activations"),
                    scheme.activations, scheme.name)
        if group.get("output_activations"):
            raise ValueError(f"{QUANT_METHOD} group {name}: output_activations are not supported")
        schemes[scheme.name] = scheme
    if len(schemes) > 1:
        raise ValueError(f"{QUANT_METHOD} checkpoint mixes schemes; fleetlm runs one per model")
    return next(iter(schemes.values()))


def _check_args(group: str, field: str, args: dict | None, expected: dict, scheme: str) -> None:
    if args is None:
        raise ValueError(f"{QUANT_METHOD} group {group}: no {field}; fleetlm runs {scheme} "
                         f"(quantized weights and activations)")
    for key, value in expected.items():
        if args.get(key, value) != value:
            raise ValueError(f"{QUANT_METHOD} group {group}: {field}.{key} is "
                             f"{args.get(key)!r}; {scheme} needs {value!r}")


def iterate_compressed_weights(model_dir: Path, progress: bool = True,
                               counter: ReadCounter | None = None, scheme: Scheme = W8A8
                               ) -> Iterator[tuple[str, Int8Weight | LazyTensor]]:
    """Yield (HF tensor name, tensor) for the folder's tensors: the scheme's weight (an
    `Int8Weight` or `Fp8Weight`: lazy data with its per-row scales) for each quantized
    `*.weight`, the others as they are. The scales are read first (they are small); a
    weight's bytes only when a loader narrows it."""
    counter = counter or ReadCounter()
    scales = _read_scales(model_dir, counter)
    for name, tensor in iterate_weights(model_dir, progress=progress, counter=counter):
        if name.endswith(UNSUPPORTED_SUFFIXES):
            raise ValueError(f"checkpoint tensor {name}: {QUANT_METHOD} schemes with zero "
                             f"points, static activation scales or packed weights are not "
                             f"supported; fleetlm runs W8A8 INT8 and FP8")
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = scales.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        yield name, tensor if scale is None else scheme.weight_class(tensor, scale)


def _read_scales(model_dir: Path, counter: ReadCounter) -> dict[str, torch.Tensor]:
    """Layer name -> its weight_scale, from every safetensors file of the folder."""
    scales = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith(SCALE_SUFFIX):
                    scale = f.get_tensor(name)
                    counter.num_bytes += scale.numel() * scale.element_size()
                    scales[name.removesuffix(SCALE_SUFFIX)] = scale
    return scales
