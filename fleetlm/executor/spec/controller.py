"""How many draft tokens each request verifies, and the acceptance statistics (no torch).

The scheduler asks `num_drafts` for every request it schedules: the runner then proposes that
many drafts after the step, and the scheduler verifies them in the request's next step. A
request whose drafts are mostly rejected costs verification work for nothing, so:

    acceptance(r)  exponential average of accepted / proposed over r's verified steps
    num_drafts(r)  while acceptance(r) >= min_acceptance_rate: k at acceptance 1/2 and above,
                   fewer below (ceil(2 k acceptance): with per-draft acceptance a the j-th
                   draft is used with probability a^j, so long runs only pay when a is high);
                   below it 0, except a probe of one draft every probe_interval steps (so a
                   request that starts copying its input again gets speculation back; the
                   interval doubles after each rejected probe, up to MAX_PROBE_BACKOFF times,
                   so text with nothing to copy pays almost nothing); 0 for all while the
                   batch is at least disable_by_batch_size (verification is no longer nearly
                   free there)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleetlm.executor.config import SpeculativeConfig

_SMOOTHING = 0.5  # weight of the newest step in a request's acceptance average
MAX_PROBE_BACKOFF = 8  # rejected probes stretch the interval up to 8 x probe_interval


@dataclass
class SpecDecodeStats:
    """Cumulative counters, as vLLM names them."""

    num_drafts: int = 0  # verified steps that carried drafts
    num_draft_tokens: int = 0  # drafts verified
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # index i: drafts i+1 taken

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verified step: the accepted drafts plus the target's own."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpecDecodeController:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.num_lookahead_slots = config.num_speculative_tokens \
            if config.method == "draft_model" else 0
        self.stats = SpecDecodeStats(
            accepted_per_position=[0] * config.num_speculative_tokens)
        self._acceptance: dict[str, float] = {}
        self._steps_off: dict[str, int] = {}  # steps since speculation stopped or last probe
        self._probe_interval: dict[str, int] = {}  # for requests that are off
        self._probing: set[str] = set()  # a probe's draft is on its way to verification

    def num_drafts(self, request_id: str, num_running: int) -> int:
        """Drafts the runner should propose for this request after the coming step."""
        config = self.config
        if config.disable_by_batch_size is not None and num_running >= config.disable_by_batch_size:
            return 0
        acceptance = self._acceptance.get(request_id, 1.0)
        if acceptance >= config.min_acceptance_rate:
            k = config.num_speculative_tokens
            return max(1, min(k, math.ceil(2 * k * acceptance)))
        interval = self._probe_interval.setdefault(request_id, config.probe_interval)
        steps_off = self._steps_off.get(request_id, 0) + 1
        self._steps_off[request_id] = steps_off % interval
        if steps_off < interval:
            return 0
        self._probing.add(request_id)
        return 1

    def record(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        """A verified step: `num_accepted` of `num_proposed` drafts were taken."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_proposed
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
        previous = self._acceptance.get(request_id, 1.0)
        rate = num_accepted / num_proposed
        self._acceptance[request_id] = (1 - _SMOOTHING) * previous + _SMOOTHING * rate
        if request_id in self._probing:
            self._probing.discard(request_id)
            base = self.config.probe_interval
            self._probe_interval[request_id] = base if num_accepted else min(
                2 * self._probe_interval[request_id], MAX_PROBE_BACKOFF * base)
        if self._acceptance[request_id] >= self.config.min_acceptance_rate:
            self._probe_interval.pop(request_id, None)  # on again: a later stop starts afresh
            self._steps_off.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)
        self._steps_off.pop(request_id, None)
        self._probe_interval.pop(request_id, None)
        self._probing.discard(request_id)
