"""Validate and tokenize a prompt, and fan an n > 1 request out into n child requests (or
resume one whose output began elsewhere)."""

from __future__ import annotations

from dataclasses import replace

from fleetlm.executor.request import Request
from fleetlm.executor.sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int,
                 eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._grammar_backend = None  # built on the first constrained request

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt) if prompt else []
        return list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem; nothing is queued for an invalid request."""
        num = len(prompt_token_ids)
        if num == 0:
            raise ValueError("prompt is empty")
        if num >= self.max_model_len:
            raise ValueError(
                f"prompt is {num} tokens long, but the model's context length is "
                f"{self.max_model_len} tokens (at least one must be left for the output)")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        params.validate_for_model(self.vocab_size)
        if params.max_tokens is not None and num + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {num + params.max_tokens} tokens ({num} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                f"messages or completion.")
        if params.structured_outputs is not None:
            self.grammar_backend.compile(params.structured_outputs)  # cached; ValueError if bad

    @property
    def grammar_backend(self):
        if self._grammar_backend is None:
            from fleetlm.executor.structured.backend import GrammarBackend

            self._grammar_backend = GrammarBackend(self.tokenizer, self.vocab_size)
        return self._grammar_backend

    def make_requests(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams, priority: int = 0,
                      arrival_time: float | None = None,
                      resume_token_ids: list[int] | None = None) -> list[Request]:
        """One Request per completion (`fan_out`).

        `resume_token_ids`: output already generated (and sent) elsewhere; the request goes on
        after them (see `Request`). Only for n == 1."""
        self.validate(prompt_token_ids, params)
        resume_token_ids = list(resume_token_ids or ())
        if resume_token_ids:
            self._validate_resume(prompt_token_ids, params, resume_token_ids)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        return [
            Request(child_id, prompt_token_ids, child, self.eos_token_id,
                    arrival_time=arrival_time, priority=priority, max_tokens=max_tokens,
                    output_token_ids=resume_token_ids)
            for child_id, child in fan_out(request_id, params)
        ]

    def _validate_resume(self, prompt_token_ids: list[int], params: SamplingParams,
                         resume_token_ids: list[int]) -> None:
        if params.n != 1:
            raise ValueError("resume_token_ids needs n == 1 (resume each completion on its own)")
        if min(resume_token_ids) < 0 or max(resume_token_ids) >= self.vocab_size:
            raise ValueError(f"resume_token_ids must be in [0, {self.vocab_size})")
        num_tokens = len(prompt_token_ids) + len(resume_token_ids)
        if num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt and resume_token_ids are {num_tokens} tokens long; the context length "
                f"is {self.max_model_len} and leaves no room for more output")
        if params.max_tokens is not None and len(resume_token_ids) >= params.max_tokens:
            raise ValueError(f"resume_token_ids already hold max_tokens ({params.max_tokens}) "
                             f"tokens: there is nothing left to generate")


def fan_out(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """The completions of a request as n == 1 requests: itself when n == 1, else child `i`
    is `child_request_id(request_id, i)` with `child_params(params, i)`. The one rule for the
    engine (`make_requests`) and the serving layer (which runs each choice on its own)."""
    if params.n == 1:
        return [(request_id, params)]
    return [(child_request_id(request_id, i), child_params(params, i)) for i in range(params.n)]


def child_request_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Completion `index` of an n > 1 request: n == 1 and seed + index (vLLM's rule), so
    seeded completions differ from each other but repeat across runs."""
    seed = None if params.seed is None else params.seed + index
    return replace(params, n=1, seed=seed)
