"""What the serving layer needs from an engine; the cluster layer depends on this, not on a class.

`AsyncEngine` implements it; CPU tests of the HTTP layer may pass another implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleetlm.executor.outputs import RequestOutput
from fleetlm.executor.sampling_params import SamplingParams


@dataclass
class EngineStats:
    """A point-in-time snapshot, cheap to take; counters are cumulative since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    num_kv_blocks: int = 0  # the KV cache's size in blocks (0: not known)
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # Speculative decoding (all 0 when it is off): verified steps with drafts, drafts
    # verified, drafts accepted, and accepted drafts by position (index i: the (i+1)-th).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()
    # KV transfer (all 0 without a connector). A prefill engine: finished prompts whose blocks
    # are held for a reader. A decode engine: loads of remote KV completed, their bytes, failed
    # loads by cause, and load latency (a `Histogram.to_dict()`, None: no loads yet).
    kv_active_leases: int = 0
    kv_transfers_done: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_failures: dict[str, int] = field(default_factory=dict)
    kv_transfer_latency: dict[str, Any] | None = None


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Any  # a Hugging Face tokenizer with the model's chat template

    def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
        resume_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream `RequestOutput`s until one has `finished=True`: cumulative, or deltas if
        `sampling_params.output_kind` is "delta" (the server asks for those). A reader that
        falls behind gets what it missed in its next output (deltas concatenated).

        `resume_token_ids` (n == 1): output a failed replica already sent; generation goes on
        after them as if this engine had produced them (same seed: same continuation), and
        the outputs' `token_ids` and `text` begin with them (`logprobs` do not).

        Raises `ValueError` (naming the field) before yielding anything if the request is
        invalid: empty prompt, prompt over the context length, bad sampling values. Closing
        the iterator early (client gone) aborts the request and frees its blocks.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown ids are ignored."""
        ...

    def stats(self) -> EngineStats: ...

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop has died; the server then answers 503."""
        ...

    async def shutdown(self) -> None: ...
