"""Per-request sampling parameters (no torch: the scheduler and the HTTP layer import this)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

_GREEDY_EPS = 1e-5
# What each output of a request holds (vLLM's `RequestOutputKind`): everything so far, or only
# what is new since the previous output (the served path: no per-step copy of the whole output).
OUTPUT_KINDS = ("cumulative", "delta")


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output (vLLM's `StructuredOutputsParams` names): exactly
    one field is set. The grammar engine (`fleetlm.executor.structured`) compiles it into a
    token mask; it checks the content, this class only the shape."""

    json: str | None = None  # a JSON schema, as JSON text (a dict is dumped on construction)
    regex: str | None = None
    choice: list[str] | None = None  # one of these strings exactly
    grammar: str | None = None  # EBNF (GBNF style, "root ::= ...") or Lark
    json_object: bool = False  # any JSON object
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON text

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):
            self.json = json.dumps(self.json)
        if isinstance(self.structural_tag, dict):
            self.structural_tag = json.dumps(self.structural_tag)
        if self.choice is not None:
            self.choice = list(self.choice)
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object, structural_tag; got {given or 'none'}")
        if self.choice is not None and (
                not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    @property
    def spec(self) -> Any:
        """The set field's value: with `kind`, what the grammar engine compiles."""
        return getattr(self, self.kind)


@dataclass
class SamplingParams:
    """What to generate and how. Field names and defaults follow vLLM's `SamplingParams`.

    `validate()` runs on construction and raises `ValueError` naming the bad field;
    `validate_for_model()` adds the checks that need the model (vocabulary size).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-N logprobs per sampled token (0: only the sampled one)
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token (0: only the token)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # None: unconstrained
    output_kind: str = "cumulative"  # one of OUTPUT_KINDS

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def is_delta(self) -> bool:
        return self.output_kind == "delta"

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate(self) -> None:
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0.0, "must be non-negative"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1 (off), 0 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be positive"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            (
                "min_tokens",
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "must not exceed max_tokens",
            ),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be non-negative"),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                "must be non-negative",
            ),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
            # The grammar decides where a constrained output ends (once complete it allows
            # only EOS); min_tokens would have to forbid that EOS, leaving no token.
            ("min_tokens", self.min_tokens == 0 or self.structured_outputs is None,
             "must be 0 with structured_outputs"),
            ("output_kind", self.output_kind in OUTPUT_KINDS, f"must be one of {OUTPUT_KINDS}"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    def validate_for_model(self, vocab_size: int) -> None:
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(
                f"stop_token_ids {bad} are not in the model's vocabulary (size {vocab_size})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > vocab_size:
                raise ValueError(f"{name} must be at most the vocabulary size {vocab_size}")
