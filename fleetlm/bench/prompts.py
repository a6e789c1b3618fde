"""Prompt text of a wanted token length, drawn from a seeded generator.

`TokenPromptSource` builds text out of real token ids: random ids (special tokens and fragments
of characters excluded) are decoded to text and re-encoded, and the ids are trimmed or topped up
until the text re-encodes to the wanted length (exactly if that happens within a few rounds, else
within `LENGTH_TOLERANCE`). Sending that text, every server with the same tokenizer sees the same
prompt length. `WordPromptSource` is the fallback without a tokenizer: common English words, one
word per wanted token, so lengths are only approximate.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fleetlm.bench.tokenizer import BenchTokenizer

LENGTH_TOLERANCE = 1  # re-encoded prompts are the wanted length +- this many tokens
_MAX_ROUNDS = 16  # decode/re-encode rounds before giving up on a length
_REPLACEMENT_CHAR = "\ufffd"  # what a lone fragment of a multi-byte character decodes to

WORD_LIST = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "it", "an", "were", "are", "which", "this", "be", "have", "has", "had", "not",
    "but", "first", "one", "their", "its", "new", "after", "who", "they", "two", "her", "she",
    "been", "other", "when", "there", "all", "also", "into", "only", "time", "can", "more",
    "some", "most", "years", "about", "city", "would", "three", "world", "over", "many", "then",
    "these", "may", "such", "between", "school", "under", "during", "part", "later", "since",
    "people", "like", "state", "water", "river", "house", "music", "family", "light", "market",
    "garden", "season", "system", "travel", "number", "paper", "morning", "question", "answer",
    "story", "engine", "signal", "window", "mountain", "village", "evening", "winter", "summer",
)  # common English words for prompts without a tokenizer


class PromptSource(Protocol):
    """Makes prompt text; `make_text` returns the text and its length in tokens (or words)."""

    is_exact: bool  # lengths are real token counts
    description: str

    def make_text(self, rng: np.random.Generator, num_tokens: int) -> tuple[str, int]: ...

    def count(self, text: str) -> int: ...


class TokenPromptSource:
    """Text from random real token ids whose re-encoding has the wanted length (+- 1)."""

    is_exact = True

    def __init__(self, tokenizer: BenchTokenizer) -> None:
        self._tokenizer = tokenizer
        self._candidate_ids = np.array(_whole_token_ids(tokenizer), dtype=np.int64)
        self.description = f"random token ids of tokenizer {tokenizer.name}"

    def make_text(self, rng: np.random.Generator, num_tokens: int) -> tuple[str, int]:
        """Raises `ValueError` if no text of `num_tokens` +- 1 tokens is found."""
        if num_tokens < 1:
            raise ValueError(f"prompt lengths must be at least 1 token, got {num_tokens}")
        token_ids = self._sample(rng, num_tokens)
        near_miss: tuple[str, int] | None = None  # first text within the tolerance
        num_overshoots = 0
        for _ in range(_MAX_ROUNDS):
            text = self._tokenizer.decode(token_ids)
            token_ids = self._tokenizer.encode(text)
            if len(token_ids) == num_tokens:
                return text, num_tokens
            if near_miss is None and abs(len(token_ids) - num_tokens) <= LENGTH_TOLERANCE:
                near_miss = (text, len(token_ids))
            if len(token_ids) > num_tokens:
                # A cut can split a character whose re-encoding grows again: cut deeper each time.
                token_ids = token_ids[:max(1, num_tokens - num_overshoots)]
                num_overshoots += 1
            else:
                token_ids = token_ids + self._sample(rng, num_tokens - len(token_ids))
        if near_miss is not None:
            return near_miss
        raise ValueError(
            f"tokenizer {self._tokenizer.name} gave no text that re-encodes to "
            f"{num_tokens} +- {LENGTH_TOLERANCE} tokens in {_MAX_ROUNDS} rounds"
        )

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    def _sample(self, rng: np.random.Generator, num_tokens: int) -> list[int]:
        return rng.choice(self._candidate_ids, size=num_tokens).tolist()


class WordPromptSource:
    """Fallback without a tokenizer: one common word per wanted token (approximate lengths)."""

    is_exact = False
    description = "word list (no tokenizer: lengths counted in words, approximate in tokens)"

    def make_text(self, rng: np.random.Generator, num_tokens: int) -> tuple[str, int]:
        if num_tokens < 1:
            raise ValueError(f"prompt lengths must be at least 1 token, got {num_tokens}")
        indices = rng.integers(0, len(WORD_LIST), size=num_tokens)
        return " ".join(WORD_LIST[i] for i in indices), num_tokens

    def count(self, text: str) -> int:
        return len(text.split())


def _whole_token_ids(tokenizer: BenchTokenizer) -> list[int]:
    """Ids that are not special and decode on their own to whole characters: byte-level
    vocabularies also hold fragments of multi-byte characters, which decode to U+FFFD and
    re-encode to several tokens."""
    special = tokenizer.special_token_ids
    return [
        i for i in range(tokenizer.vocab_size)
        if i not in special and _REPLACEMENT_CHAR not in tokenizer.decode([i])
    ]


def make_prompt_source(tokenizer: BenchTokenizer | None) -> PromptSource:
    return WordPromptSource() if tokenizer is None else TokenPromptSource(tokenizer)
