"""`fleetlm quantize MODEL OUT --scheme W8A8`: write a compressed-tensors W8A8 INT8 checkpoint,
the format LLM Compressor writes and vLLM, transformers and fleetlm load.

LLM Compressor itself is not used: it pins transformers to an older release than fleetlm's and
brings datasets, pandas and pyarrow. This writer does what its `QuantizationModifier(scheme=
"W8A8", targets="Linear", ignore=["lm_head"])` does without calibration data (no SmoothQuant or
GPTQ pass): each Linear weight rounded to nearest, one symmetric scale per output row computed
as compressed-tensors' min-max observer does (`max|w| / 127.5`, a zero scale replaced by the
dtype's eps, `q = clamp(round(w / scale), -128, 127)`), stored as int8 `weight` plus
`weight_scale` of shape (rows, 1) in the model's dtype; activations are quantized per token at
run time (nothing to store). Everything else (embeddings, norms, the LM head) is copied as it
is, and so are the tokenizer and generation files.
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

from fleetlm.executor.weights.compressed import QUANT_METHOD, W8A8_ACTIVATIONS, W8A8_WEIGHTS
from fleetlm.executor.weights.convert import meta_model
from fleetlm.executor.weights.loader import load_hf_config
from fleetlm.executor.weights.resolve import resolve_model

logger = logging.getLogger("fleetlm.weights")

SCHEMES = ("W8A8",)
IGNORE = ["lm_head"]
INDEX_FILE = "model.safetensors.index.json"
COPIED_SKIP = ("config.json", INDEX_FILE)


def w8a8_config() -> dict:
    """The `quantization_config` LLM Compressor writes for its W8A8 (INT8) preset scheme."""
    def args(fields: dict, **extra) -> dict:
        return {"actorder": None, "block_structure": None, "group_size": None,
                "observer": "minmax", "observer_kwargs": {}, **fields, **extra}

    return {
        "quant_method": QUANT_METHOD,
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "format": "int-quantized",
            "weights": args(W8A8_WEIGHTS, dynamic=False),
            "input_activations": args(W8A8_ACTIVATIONS, observer=None),
            "output_activations": None,
        }},
        "ignore": IGNORE,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale of shape (rows, 1) in the weight's dtype), as compressed-tensors'
    symmetric channel-wise min-max quantization computes them."""
    amax = weight.abs().amax(dim=1, keepdim=True)
    scale = amax / torch.tensor(127.5, dtype=weight.dtype)
    scale = torch.where(scale == 0, torch.finfo(weight.dtype).eps, scale)
    q = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


def quantize_checkpoint(model: str, out_dir: Path, scheme: str = "W8A8",
                        progress: bool = True) -> Path:
    """Write `model` (a built-in name, .gguf file or Hugging Face folder) quantized by
    `scheme` into `out_dir`; returns `out_dir`."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not supported; choose from {', '.join(SCHEMES)}")
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
    total = sum(_num_tensors(file) for file in files)
    written: dict[str, str] = {}
    with tqdm(total=total, desc=f"Quantizing {scheme}", unit="tensors",
              disable=not progress) as bar:
        for file in files:
            tensors = _quantized_file(file, targets, bar)
            save_file(tensors, out_dir / file.name, metadata={"format": "pt"})
            written.update(dict.fromkeys(tensors, file.name))
    _write_config(source, out_dir)
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


def _quantized_file(file: Path, targets: set[str], bar) -> dict[str, torch.Tensor]:
    tensors = {}
    with safe_open(file, framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = f.get_tensor(name)
            if name in targets and tensor.dim() == 2 and tensor.is_floating_point():
                tensors[name], tensors[f"{name}_scale"] = quantize_weight(tensor)
            else:
                tensors[name] = tensor.contiguous()
            bar.update()
    return tensors


def _write_config(source: Path, out_dir: Path) -> None:
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = w8a8_config()
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
