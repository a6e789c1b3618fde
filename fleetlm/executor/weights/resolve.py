"""Model name or path -> a Hugging Face model folder (config, safetensors, tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path

from fleetlm.executor.weights.builtin import BUILTIN_MODELS, builtin_gguf_path
from fleetlm.executor.weights.cache import cache_key, default_cache_dir, get_or_create
from fleetlm.executor.weights.convert import CONVERTER_VERSION, convert_gguf

HF_CONFIG_FILE = "config.json"
GGUF_SUFFIX = ".gguf"

logger = logging.getLogger("fleetlm.weights")


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face model folder for a built-in name, a `.gguf` file or a folder.

    - a built-in name (see BUILTIN_MODELS): its packaged GGUF, converted on first use;
    - a `.gguf` file: converted on first use;
    - a folder with config.json and *.safetensors: returned as is.
    Conversions are cached in `cache_dir` (default: `default_cache_dir()`) under
    `<name>-<key>`. Nothing is downloaded. Raises ValueError for a name that is neither
    built-in nor an existing path, FileNotFoundError for a missing path or an incomplete folder.
    """
    if name_or_path in BUILTIN_MODELS:
        gguf_path = builtin_gguf_path(name_or_path)
        logger.info("Built-in model %s is %s", name_or_path, gguf_path)
        return _converted(gguf_path, name_or_path, cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _checked_hf_dir(path)
    if path.is_file():
        if path.suffix != GGUF_SUFFIX:
            raise ValueError(f"{path}: unsupported model file; expected a {GGUF_SUFFIX} file "
                             f"or a Hugging Face model folder")
        return _converted(path, path.stem, cache_dir)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"no model file or folder at {path.resolve()}")
    raise ValueError(
        f"unknown model {name_or_path!r}: not a built-in model "
        f"(built-ins: {', '.join(sorted(BUILTIN_MODELS))}) and no file or folder at "
        f"{path.resolve()}; models are never downloaded, pass a local folder or .gguf file")


def resolve_tokenizer(name_or_path: str | None, model_dir: Path) -> Path:
    """The folder to load the tokenizer from: the model's own folder when `name_or_path` is
    None, else a built-in model's or a .gguf file's (converted), or the folder named."""
    if name_or_path is None:
        return model_dir
    path = Path(name_or_path).expanduser()
    return path.resolve() if path.is_dir() else resolve_model(name_or_path)


def _converted(gguf_path: Path, name: str, cache_dir: Path | None) -> Path:
    root = cache_dir if cache_dir is not None else default_cache_dir()
    entry = root / f"{name}-{cache_key(gguf_path, CONVERTER_VERSION)}"
    return get_or_create(entry, lambda tmp_dir: convert_gguf(gguf_path, tmp_dir))


def _checked_hf_dir(path: Path) -> Path:
    path = path.resolve()
    if not (path / HF_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: no {HF_CONFIG_FILE}")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    logger.info("Using model folder %s", path)
    return path


def _looks_like_path(name_or_path: str) -> bool:
    """True for what can only be a local path: absolute, ~ or ./ prefixed, or a .gguf name.
    A bare `org/name` is treated as an (unknown) model name, as a hub id would be."""
    return (name_or_path.startswith(("/", "~", "./", "../"))
            or name_or_path.endswith(GGUF_SUFFIX))
