"""Reading a Hugging Face model folder: config, tokenizer and a stream of weights."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger("fleetlm.weights")


class LazyTensor:
    """A checkpoint tensor not read yet: `narrow` reads only the rows or columns asked for,
    so a tensor-parallel rank reads its own shard and never the whole tensor."""

    def __init__(self, file_slice, counter: ReadCounter) -> None:
        self._slice = file_slice
        self._counter = counter
        self.shape = torch.Size(file_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        tensor = self._slice[index]
        self._counter.num_bytes += tensor.numel() * tensor.element_size()
        return tensor


class ReadCounter:
    """Bytes read from checkpoint files (shown by tests: a TP rank reads only its shards)."""

    def __init__(self) -> None:
        self.num_bytes = 0


def iterate_weights(model_dir: Path, progress: bool = True,
                    counter: ReadCounter | None = None) -> Iterator[tuple[str, LazyTensor]]:
    """Yield (HF tensor name, `LazyTensor`) for every tensor of every *.safetensors file in
    `model_dir`, with a progress bar. Nothing is read until a loader narrows the tensor.

    Intended for a model's `load_weights()`; `counter` adds up the bytes actually read.
    Raises FileNotFoundError when the folder has no *.safetensors file.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    counter = counter or ReadCounter()
    num_tensors = sum(_num_tensors(f) for f in files)
    logger.info("Loading %d tensors from %d file(s) in %s", num_tensors, len(files), model_dir)
    with tqdm(total=num_tensors, desc="Loading weights", unit="tensors",
              disable=not progress) as bar:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                names = f.keys()  # safe_open is not a dict: it cannot be iterated directly
                for name in names:
                    yield name, LazyTensor(f.get_slice(name), counter)
                    bar.update()


def _num_tensors(file: Path) -> int:
    with safe_open(file, framework="pt", device="cpu") as f:
        return len(f.keys())


def load_hf_config(model_dir: Path) -> PretrainedConfig:
    """The model's transformers config (config.json)."""
    return AutoConfig.from_pretrained(model_dir)


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer; warns when it has no chat template (chat requests need one)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        logger.warning("Tokenizer in %s has no chat template", model_dir)
    return tokenizer
