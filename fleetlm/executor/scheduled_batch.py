"""The batch one `Scheduler.schedule()` call builds, turned into a `SchedulerOutput` at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetlm.executor.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from fleetlm.executor.request import Request


@dataclass
class ScheduledBatch:
    """Requests and tokens chosen so far in one step, and the token budget left.

    Adding a request marks its tokens computed at once, so the next `schedule()` may run
    before this step's results are in. The `num_computed_tokens` sent to the workers is the
    count before this step.
    """

    token_budget: int
    max_num_reqs: int | None = None  # None: as many as the token budget allows
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    num_draft_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def has_room(self) -> bool:
        return self.token_budget > 0 and (
            self.max_num_reqs is None or len(self.num_scheduled_tokens) < self.max_num_reqs)

    def add_new(self, request: Request, block_ids: list[int], num_tokens: int) -> None:
        """A request the workers do not hold: sent in full, with its whole block table."""
        request.num_tokens_sent = request.num_tokens
        self.new_reqs.append(NewRequestData(
            req_id=request.request_id,
            token_ids=list(request.all_token_ids),
            num_prompt_tokens=request.num_prompt_tokens,
            sampling_params=request.sampling_params,
            block_ids=block_ids,
            num_computed_tokens=request.num_computed_tokens,
            eos_token_id=request.eos_token_id,
        ))
        self._spend(request, num_tokens)

    def add_cached(self, request: Request, new_block_ids: list[int], num_tokens: int,
                   spec_token_ids: list[int] = ()) -> None:
        """A request the workers hold: only the blocks appended to its table this step and
        the tokens appended since they last heard of it. `num_tokens` includes the draft
        tokens `spec_token_ids` verified after the request's last token."""
        self.cached_reqs.req_ids.append(request.request_id)
        self.cached_reqs.new_block_ids.append(new_block_ids)
        self.cached_reqs.num_computed_tokens.append(request.num_computed_tokens)
        self.cached_reqs.new_token_ids.append(request.all_token_ids[request.num_tokens_sent:])
        request.num_tokens_sent = request.num_tokens
        if spec_token_ids:
            self.spec_decode_tokens[request.request_id] = list(spec_token_ids)
        self._spend(request, num_tokens)

    def _spend(self, request: Request, num_tokens: int) -> None:
        assert 0 < num_tokens <= self.token_budget, f"{num_tokens} tokens, {self.token_budget} left"
        self.num_scheduled_tokens[request.request_id] = num_tokens
        self.token_budget -= num_tokens
        request.num_computed_tokens += num_tokens

    def to_output(self, finished_req_ids: set[str], step_id: int) -> SchedulerOutput:
        return SchedulerOutput(
            scheduled_new_reqs=self.new_reqs,
            scheduled_cached_reqs=self.cached_reqs,
            num_scheduled_tokens=self.num_scheduled_tokens,
            total_num_scheduled_tokens=sum(self.num_scheduled_tokens.values()),
            finished_req_ids=finished_req_ids,
            step_id=step_id,
            scheduled_spec_decode_tokens=self.spec_decode_tokens,
            num_draft_tokens=self.num_draft_tokens,
        )
