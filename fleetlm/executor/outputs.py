"""The data that crosses boundaries: scheduler -> executor -> scheduler -> caller.

Plain dataclasses with no torch, so they can cross to worker processes (as msgpack, see
`wire.py`) and be tested on their own. New requests are sent to the workers in full once
(`NewRequestData`); requests the workers already know are sent as per-step diffs
(`CachedRequestData`), which carry the tokens sampled since (every pipeline stage needs them,
not only the one that sampled). A request resumed after preemption is sent in full again,
since its blocks were all replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetlm.executor.sampling_params import SamplingParams

# One position's logprobs: the chosen token first, then the top-N alternatives by logprob.
PositionLogprobs = list[tuple[int, float]]


@dataclass
class NewRequestData:
    req_id: str
    token_ids: list[int]  # prompt + any output tokens already generated (after preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_id: int | None = None


@dataclass
class CachedRequestData:
    """Diffs for requests the workers already hold, one list entry per request."""

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # appended to the table
    num_computed_tokens: list[int] = field(default_factory=list)
    # Tokens appended since the workers last heard of the request (its samples, accepted
    # drafts): the workers append them to what they hold.
    new_token_ids: list[list[int]] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # workers drop their state for these (finished or preempted)
    step_id: int = 0  # counts schedule() calls: matches outputs to steps when several are in flight
    # Speculative decoding: draft tokens verified this step, after each request's last token
    # (they count in num_scheduled_tokens), and how many drafts to propose for each request
    # after this step (absent: none).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    # The KV connector's instructions to the workers for this step (loads to start); None:
    # none. A step may carry them with no tokens scheduled.
    kv_connector_metadata: Any = None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    @property
    def is_idle(self) -> bool:
        """Nothing for the workers to compute, drop or start."""
        return self.is_empty and not self.finished_req_ids and self.kv_connector_metadata is None


@dataclass
class ModelRunnerOutput:
    """What the workers computed: the new tokens of each request whose prompt is complete
    (one, or with speculative decoding the accepted drafts plus one), and draft tokens
    proposed for the next step.

    Requests in the middle of a chunked prefill get an empty list in `sampled_token_ids`.
    """

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    # Prompt logprobs of the positions computed this step (None for the first prompt token).
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)
    kv_connector_output: KVConnectorOutput | None = None
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class KVConnectorOutput:
    """One rank's KV-transfer news for one step; the executor merges every rank's, since a
    transfer is done only when all ranks have done their part, and failed if any rank's
    part failed. A failed load is in `failed_recving` (request id -> reason), never in
    `finished_recving`."""

    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_recving: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One request's progress in one step, from the scheduler to the output processor."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    new_prompt_logprobs: list[PositionLogprobs | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # for "error": what went wrong
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None  # a prefill engine's, when finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative text so far (a delta's: only the text new since the last output)
    token_ids: list[int]  # cumulative token ids so far (a delta's: only the new ones)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same completion."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if self.logprobs is not None and delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    """What a caller of the offline or async API receives: cumulative, like vLLM's, or, with
    `SamplingParams.output_kind == "delta"`, a delta (`is_delta`): each completion's text,
    token ids and logprobs new since the previous output, so that a request's deltas,
    concatenated, are its cumulative output. A resumed request's first delta begins with the
    resumed tokens and their text, as its cumulative outputs do. The other fields are the
    latest values in both kinds: `prompt_logprobs` (a reference, not a copy), the metrics.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_token, finished
    # A prefill engine's finished request: where a decode engine reads its KV from.
    kv_transfer_params: dict[str, Any] | None = None
    is_delta: bool = False


def coalesce(earlier: RequestOutput | None, later: RequestOutput) -> RequestOutput:
    """One output that says what `earlier` and then `later` said, for a reader that fell
    behind: `later` itself when it is cumulative; a delta is appended to `earlier` in place
    (so `earlier` must be the caller's own), each completion by its index."""
    if earlier is None or not later.is_delta:
        return later
    assert earlier.is_delta, "a delta follows deltas"
    for mine, theirs in zip(earlier.outputs, later.outputs, strict=True):
        assert mine.index == theirs.index, "deltas list the same completions in order"
        mine.extend(theirs)
    earlier.finished = later.finished
    earlier.prompt_logprobs = later.prompt_logprobs
    earlier.num_cached_tokens = later.num_cached_tokens
    earlier.metrics = later.metrics
    earlier.kv_transfer_params = later.kv_transfer_params
    return earlier
