"""One request's state as the scheduler sees it (no torch)."""

from __future__ import annotations

import enum
import time

from fleetlm.executor.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after this point is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # the engine could not serve it (a KV load failed)

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A prompt and the tokens generated for it so far.

    Progress is `num_computed_tokens` (tokens whose KV is in the cache) catching up with
    `num_tokens` (prompt + output). `block_hashes` holds the chained hash of every full block
    of `all_token_ids`; the KV cache manager extends it as tokens are appended.

    `output_token_ids` given at creation resume a request generated elsewhere (a stream
    moved off a failed replica): they count as output from the start, so max_tokens,
    min_tokens, penalties and seeded sampling (seeded by output position) go on exactly as if
    this engine had generated them; their KV is computed like the prompt's.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        max_tokens: int | None = None,
        output_token_ids: list[int] | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.max_tokens = sampling_params.max_tokens if max_tokens is None else max_tokens
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.all_token_ids: list[int] = self.prompt_token_ids + list(output_token_ids or ())
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 before
        self.num_preemptions = 0
        self.block_hashes: list[int] = []
        self.num_tokens_sent = 0  # leading tokens of all_token_ids the workers hold
        # Draft tokens to verify in the next step (speculative decoding); never part of
        # all_token_ids until the target model accepts them.
        self.spec_token_ids: list[int] = []
        # Disaggregated prefill/decode (`fleetlm.kvtransfer`): {"do_remote_decode": True} asks
        # a prefill engine to keep the KV for a decode engine; a decode engine's request
        # carries the prefill engine's transfer params to read it from.
        self.kv_transfer_params: dict | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.all_token_ids.extend(token_ids)

    def __lt__(self, other: Request) -> bool:  # priority queue order: priority, then arrival
        return (self.priority, self.arrival_time) < (other.priority, other.arrival_time)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )


def check_stop(request: Request, max_model_len: int) -> bool:
    """Mark the request finished if its last token ends it; True if it did."""
    params = request.sampling_params
    if request.num_output_tokens < params.min_tokens:
        return False
    last = request.all_token_ids[-1]
    if not params.ignore_eos and last == request.eos_token_id:
        request.status = RequestStatus.FINISHED_STOPPED
        return True
    if last in params.stop_token_ids:
        request.status = RequestStatus.FINISHED_STOPPED
        request.stop_reason = last
        return True
    if request.num_tokens >= max_model_len or (
        request.max_tokens is not None and request.num_output_tokens >= request.max_tokens
    ):
        request.status = RequestStatus.FINISHED_LENGTH
        return True
    return False
