"""`fleetlm quantize MODEL OUT --scheme W8A8|FP8_DYNAMIC`: write a compressed-tensors W8A8 INT8
or FP8 checkpoint, the format LLM Compressor writes and vLLM, transformers and fleetlm load.

LLM Compressor itself is not used: it pins transformers to an older release than fleetlm's and
brings datasets, pandas and pyarrow. This writer does what its `QuantizationModifier(scheme=
"W8A8", targets="Linear", ignore=["lm_head"])` does without calibration data (no SmoothQuant or
GPTQ pass): each Linear weight rounded to nearest, one symmetric scale per output row computed
as compressed-tensors' min-max observer does (`max|w| / 127.5`, a zero scale replaced by the
dtype's eps, `q = clamp(round(w / scale), -128, 127)`), stored as int8 `weight` plus
`weight_scale` of shape (rows, 1) in the model's dtype; activations are quantized per token at
run time (nothing to store). FP8_DYNAMIC (LLM Compressor's preset of that name, the GPU
scheme) is the same with float8 e4m3: `scale = max|w| / 448`, `q = clamp(w / scale, -448, 448)`
cast to float8 (round to nearest). Everything else (embeddings, norms, the LM head) is copied as
it is, and so are the tokenizer and generation files.

`smoothquant=STRENGTH` first runs SmoothQuant (Xiao et al. 2023), as LLM Compressor's
`SmoothQuantModifier(smoothing_strength=STRENGTH)` with its Llama mappings does: a few
calibration prompts go through the float model (transformers) and each input channel j of
q/k/v and of gate/up gets `s_j = max|x_j|^a / max|W_:,j|^(1-a)`; the preceding RMSNorm's weight
is divided by s and those weights' columns multiplied by it. The float model computes the same
function; the activation outliers that per-token int8 scales lose (SmolLM2 has a few channels
far above the rest) move into the weights, whose scales are per row.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from fleetlm.executor.weights.compressed import (
    FP8_ACTIVATIONS,
    FP8_WEIGHTS,
    QUANT_METHOD,
    W8A8_ACTIVATIONS,
    W8A8_WEIGHTS,
)
from fleetlm.executor.weights.convert import meta_model
from fleetlm.executor.weights.loader import load_hf_config
from fleetlm.executor.weights.resolve import resolve_model
from fleetlm.kernels.fp8_linear import FP8, FP8_MAX

logger = logging.getLogger("fleetlm.weights")

SCHEMES = ("W8A8", "FP8_DYNAMIC")
IGNORE = ["lm_head"]
INDEX_FILE = "model.safetensors.index.json"
COPIED_SKIP = ("config.json", INDEX_FILE)


def w8a8_config(scheme: str = "W8A8") -> dict:
    """The `quantization_config` LLM Compressor writes for its W8A8 (INT8) or FP8_DYNAMIC
    preset scheme."""
    def args(fields: dict, **extra) -> dict:
        return {"actorder": None, "block_structure": None, "group_size": None,
                "observer": "minmax", "observer_kwargs": {}, **fields, **extra}

    fp8 = scheme == "FP8_DYNAMIC"
    weights, activations = (FP8_WEIGHTS, FP8_ACTIVATIONS) if fp8 else (
        W8A8_WEIGHTS, W8A8_ACTIVATIONS)
    group_format = "float-quantized" if fp8 else "int-quantized"
    return {
        "quant_method": QUANT_METHOD,
        "format": group_format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "format": group_format,
            "weights": args(weights, dynamic=False),
            "input_activations": args(activations, observer=None),
            "output_activations": None,
        }},
        "ignore": IGNORE,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _row_scales(weight: torch.Tensor, half_range: float) -> torch.Tensor:
    """compressed-tensors' symmetric channel-wise min-max scales, (rows, 1) in the weight's
    dtype: `max|w| / half_range`, a zero scale replaced by the dtype's eps."""
    scale = weight.abs().amax(dim=1, keepdim=True) / torch.tensor(half_range, dtype=weight.dtype)
    return torch.where(scale == 0, torch.finfo(weight.dtype).eps, scale)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale of shape (rows, 1) in the weight's dtype), as compressed-tensors'
    symmetric channel-wise min-max quantization computes them."""
    scale = _row_scales(weight, 127.5)
    return torch.round(weight / scale).clamp(-128, 127).to(torch.int8), scale


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 weight, scale of shape (rows, 1) in the weight's dtype), the same for
    float8 (rounded to nearest by the cast)."""
    scale = _row_scales(weight, FP8_MAX)
    return (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


QUANTIZERS = {"W8A8": quantize_weight, "FP8_DYNAMIC": quantize_weight_fp8}


def quantize_checkpoint(model: str, out_dir: Path, scheme: str = "W8A8",
                        progress: bool = True, smoothquant: float | None = None,
                        calibration: list[str] | None = None) -> Path:
    """Write `model` (a built-in name, .gguf file or Hugging Face folder) quantized by
    `scheme` into `out_dir`; returns `out_dir`. `smoothquant` (a strength in [0, 1]) smooths
    first, calibrated on `calibration` (texts; default `CALIBRATION_TEXTS`)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not supported; choose from {', '.join(SCHEMES)}")
    if smoothquant is not None and not 0.0 <= smoothquant <= 1.0:
        raise ValueError(f"smoothquant strength {smoothquant} must be in [0, 1]")
    source = resolve_model(model)
    hf_config = load_hf_config(source)
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ValueError(f"{model} is already quantized; quantize a float model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = _linear_weights(hf_config)
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source} has no *.safetensors weights")
    smoothed = {} if smoothquant is None else smooth(
        source, smoothquant, calibration or CALIBRATION_TEXTS)
    total = sum(_num_tensors(file) for file in files)
    written: dict[str, str] = {}
    with tqdm(total=total, desc=f"Quantizing {scheme}", unit="tensors",
              disable=not progress) as bar:
        for file in files:
            tensors = _quantized_file(file, targets, bar, smoothed, QUANTIZERS[scheme])
            save_file(tensors, out_dir / file.name, metadata={"format": "pt"})
            written.update(dict.fromkeys(tensors, file.name))
    _write_config(source, out_dir, scheme)
    _write_index(source, out_dir, written)
    _copy_other_files(source, out_dir)
    logger.info("Wrote %s %s checkpoint of %s to %s (%d linear weights quantized)",
                QUANT_METHOD, scheme, model, out_dir, len(targets))
    return out_dir


def _linear_weights(hf_config) -> set[str]:
    """Checkpoint names of the Linear weights the scheme targets (all but `IGNORE`)."""
    model = meta_model(hf_config)
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in IGNORE}


def _num_tensors(file: Path) -> int:
    with safe_open(file, framework="pt", device="cpu") as f:
        return len(f.keys())


def _quantized_file(file: Path, targets: set[str], bar, replaced: dict[str, torch.Tensor],
                    quantize=quantize_weight) -> dict[str, torch.Tensor]:
    """The file's tensors, targets quantized by `quantize`; `replaced` (name -> tensor) stands
    in for the file's own (smoothed weights and norms)."""
    tensors = {}
    with safe_open(file, framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = f.get_tensor(name)
            if name in replaced:
                tensor = replaced[name].to(tensor.dtype)
            if name in targets and tensor.dim() == 2 and tensor.is_floating_point():
                tensors[name], tensors[f"{name}_scale"] = quantize(tensor)
            else:
                tensors[name] = tensor.contiguous()
            bar.update()
    return tensors


# ---- SmoothQuant -------------------------------------------------------------------------------
# (the module before them, the linear layers that read its output), per decoder layer: LLM
# Compressor's default mappings for Llama-family models. The module before is a norm (its
# weight divided by s) or up_proj (its rows divided by s: down_proj reads silu(gate) * up).
SMOOTH_MAPPINGS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                        "self_attn.v_proj")),
                   ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                   ("mlp.up_proj", ("mlp.down_proj",)))
# Calibration prompts when none are given: varied on purpose (prose, code, other languages and
# scripts, numbers, chat), since nothing can be downloaded; each goes through the chat template.
CALIBRATION_TEXTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Quelle est la différence entre un chat et un chien ? Réponds en français.",
    "用一句话介绍一下长城。",
    "Translate to Russian: The weather is nice today.",
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "Tell me a story about a dragon and a robot who become friends.",
    "Explain photosynthesis to a ten-year-old.",
    "List the first twenty prime numbers, separated by commas.",
    "What is 1234 multiplied by 5678? Show your working.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "Give me a recipe for pancakes with the quantities in grams.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY 2 DESC;",
    "Write a haiku about the sea in winter.",
    "¿Cuáles son los planetas del sistema solar?",
    "Describe the rules of chess for a beginner, step by step.",
)
SMOOTH_EPS = 1e-5  # keeps a scale finite for a channel that never fired


def smooth(source: Path, strength: float, texts) -> dict[str, torch.Tensor]:
    """SmoothQuant's smoothed tensors (norm weights and linear weights, checkpoint names) of
    the float model in `source`, calibrated on `texts`."""
    import transformers

    from fleetlm.executor.weights.loader import load_tokenizer

    tokenizer = load_tokenizer(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    layers = model.model.layers
    maxima: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    names = {name for mapping in SMOOTH_MAPPINGS for name in (mapping[0], *mapping[1])}
    missing = sorted(name for name in names if not _has_submodule(layers[0], name))
    if missing:
        raise ValueError(f"SmoothQuant's mappings need a dense Llama-family layer; "
                         f"{type(model).__name__} has no {', '.join(missing)}")
    for i, layer in enumerate(layers):
        for norm, linears in SMOOTH_MAPPINGS:
            first = layer.get_submodule(linears[0])
            hooks.append(first.register_forward_pre_hook(_recorder(maxima, (i, norm))))
    try:
        with torch.no_grad():
            for text in texts:
                ids = _calibration_ids(tokenizer, text)
                model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    smoothed = {}
    for i, layer in enumerate(layers):
        for norm, linears in SMOOTH_MAPPINGS:
            weights = [layer.get_submodule(name).weight.detach() for name in linears]
            w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
            x_max = maxima[(i, norm)]
            scale = (x_max.pow(strength) / w_max.clamp(min=SMOOTH_EPS).pow(1 - strength)).clamp(
                min=SMOOTH_EPS)
            before = f"model.layers.{i}.{norm}.weight"
            weight_before = smoothed.get(before, layer.get_submodule(norm).weight.detach())
            smoothed[before] = weight_before / (scale if weight_before.dim() == 1 else
                                                scale[:, None])
            for name, weight in zip(linears, weights):
                key = f"model.layers.{i}.{name}.weight"
                smoothed[key] = smoothed.get(key, weight) * scale
    return smoothed


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _recorder(maxima: dict, key: tuple[int, str]):
    def record(module, args) -> None:
        x_max = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
        maxima[key] = x_max if key not in maxima else torch.maximum(maxima[key], x_max)
    return record


def _calibration_ids(tokenizer, text: str) -> list[int]:
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
            return_dict=False))
    return tokenizer.encode(text)


def _write_config(source: Path, out_dir: Path, scheme: str) -> None:
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = w8a8_config(scheme)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_index(source: Path, out_dir: Path, written: dict[str, str]) -> None:
    if not (source / INDEX_FILE).exists():
        return
    index = json.loads((source / INDEX_FILE).read_text())
    index["weight_map"] = dict(sorted(written.items()))
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _copy_other_files(source: Path, out_dir: Path) -> None:
    """Tokenizer, chat template, generation config: every other file of the folder."""
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in COPIED_SKIP:
            shutil.copy2(path, out_dir / path.name)
