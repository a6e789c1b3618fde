"""The token-budget scheduler: which tokens of which requests run in the next step.

There are no prefill and decode phases. Each request's `num_computed_tokens` catches up
with its `num_tokens`; each step spends `max_num_batched_tokens` on running requests first
(a long prompt is thereby chunked), then admits waiting ones. When blocks run out, the
request at the back of the running list is preempted and later recomputed. No torch here.

Where an unfinished request is (a finished one whose blocks a connector still sends is in
`sending`):
    waiting   queued for admission, holding no blocks (new or preempted)
    loading   admitted, blocks held for its whole prompt, remote KV arriving asynchronously
    loaded    remote KV arrived (or failed to, and its tokens after the local prefix hits
              are computed here); admitted ahead of `waiting`, needing no new blocks
    running   gets tokens each step
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from fleetlm.executor.block_pool import KVCacheBlock
from fleetlm.executor.config import SchedulerConfig
from fleetlm.executor.kv_cache_manager import KVCacheManager
from fleetlm.executor.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from fleetlm.executor.request import Request, RequestStatus, check_stop
from fleetlm.executor.request_queue import create_request_queue
from fleetlm.executor.scheduled_batch import ScheduledBatch
from fleetlm.executor.spec.controller import SpecDecodeController
from fleetlm.executor.transfer_stats import TransferStats
from fleetlm.kvtransfer.base import KVConnectorScheduler, NoKVConnectorScheduler


class SchedulerQueueFullError(RuntimeError):
    """`add_request` while `max_num_waiting` requests already wait (the server answers 503)."""


def _num_new_tokens(request: Request, token_budget: int) -> int:
    return min(request.num_tokens - request.num_computed_tokens, token_budget)


class _Loading(NamedTuple):
    request: Request
    num_computed_tokens: int  # once loaded
    num_local_tokens: int  # local prefix hits: what is valid if the load fails


@dataclass
class _Admission:
    """How a waiting request would start: prefix hits, remote tokens, blocks and first chunk."""

    computed_blocks: list[KVCacheBlock]  # local prefix hits
    num_local_tokens: int
    num_computed_tokens: int  # local hits + remote tokens
    num_external_tokens: int
    num_slot_tokens: int  # tokens after the hits that get blocks now
    num_new_tokens: int  # scheduled now; 0 while remote KV loads asynchronously

    @property
    def is_loading_async(self) -> bool:
        return self.num_new_tokens == 0


class Scheduler:
    """Decides each step's batch and turns the workers' samples into per-request outputs.

    The context length is `min(config.max_model_len, all KV blocks' tokens)`, so a request
    that could never fit in the cache finishes with "length" instead of preempting forever.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        connector: KVConnectorScheduler | None = None,
        spec: SpecDecodeController | None = None,
    ) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.connector = connector if connector is not None else NoKVConnectorScheduler()
        self.spec = spec  # speculative decoding; None: off
        num_cache_tokens = kv_cache_manager.num_blocks * kv_cache_manager.block_size
        self.max_model_len = min(config.max_model_len, num_cache_tokens)
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting = create_request_queue(config.policy)
        self.loading: dict[str, _Loading] = {}
        self.loaded: list[Request] = []
        self.running: list[Request] = []
        self.sending: dict[str, Request] = {}
        self.transfer_stats = TransferStats()  # of the loads of remote KV
        self.finished_req_ids: set[str] = set()  # since the last schedule(), for the workers
        self.num_preemptions = 0
        self.num_steps = 0
        # Steps scheduled but not yet updated (several under pipeline parallelism): each
        # request's preemption count when scheduled, so that a step's sample for a request
        # preempted (and perhaps readmitted) since then is recognised as stale.
        self._in_flight: dict[int, dict[str, int]] = {}

    # ---- requests in and out ----

    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ValueError for a duplicate id or a prompt that does not
        fit the context, SchedulerQueueFullError when `max_num_waiting` requests wait."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not 0 < request.num_prompt_tokens <= self.max_model_len:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens; it must have between 1 and "
                f"the context length {self.max_model_len}"
            )
        max_num_waiting = self.config.max_num_waiting
        if max_num_waiting is not None and self.num_waiting >= max_num_waiting:
            raise SchedulerQueueFullError(f"{max_num_waiting} requests are already waiting")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (client gone, stop string found) in any state and
        free their blocks now. Unknown or already finished ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"status must be a finished status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._detach(request)
                request.status = status
                self._release(request)

    def finish_sending(self, request_ids: Iterable[str]) -> None:
        """The connector has sent (or given up sending) these finished requests' blocks."""
        for request_id in request_ids:
            request = self.sending.pop(request_id, None)
            if request is not None:
                self.kv_cache_manager.free(request)

    def finish_receiving(self, request_ids: Iterable[str]) -> None:
        """Asynchronously loaded KV has arrived: the requests may run from the next step."""
        for request_id in request_ids:
            loading = self.loading.pop(request_id, None)
            if loading is not None:
                request = loading.request
                request.num_computed_tokens = loading.num_computed_tokens
                self.kv_cache_manager.cache_blocks(request, loading.num_computed_tokens)
                self.loaded.append(request)
                self.transfer_stats.on_done(request_id)

    def fail_receiving(self, failures: Mapping[str, str]) -> list[EngineCoreOutput]:
        """Asynchronous loads that failed (request id -> reason). Their blocks may hold
        anything, so nothing they hold counts as computed beyond the local prefix hits (the
        blocks after the hits were never offered to the prefix cache). By the connector's
        `failure_policy`, `recompute` computes the rest here; `fail` finishes the request
        with finish_reason "error" (returned, for the caller). Unknown ids are ignored."""
        outputs = []
        for request_id, reason in failures.items():
            loading = self.loading.pop(request_id, None)
            if loading is None:
                continue
            request = loading.request
            self.transfer_stats.on_failed(request_id, reason)
            if self.connector.failure_policy == "fail":
                request.status = RequestStatus.FINISHED_ERROR
                request.stop_reason = f"KV transfer failed: {reason}"
                outputs.append(self._finished_output(request, self._release(request)))
            else:
                request.num_computed_tokens = loading.num_local_tokens
                request.num_cached_tokens = loading.num_local_tokens
                self.loaded.append(request)
        return outputs

    # ---- one step ----

    def schedule(self) -> SchedulerOutput:
        """The next step: running requests first, then admissions unless one was preempted."""
        batch = ScheduledBatch(self.config.max_num_batched_tokens, self._max_num_reqs_per_step())
        num_preemptions_before = self.num_preemptions
        self.waiting.order_running(self.running)
        self._schedule_running(batch)
        if self.num_preemptions == num_preemptions_before:
            self._schedule_loaded(batch)
            self._schedule_waiting(batch)
        self.num_steps += 1
        output = batch.to_output(self.finished_req_ids, self.num_steps)
        output.kv_connector_metadata = self.connector.build_connector_meta()
        self.finished_req_ids = set()
        if not output.is_empty:
            self._in_flight[output.step_id] = {
                r: self.requests[r].num_preemptions for r in output.num_scheduled_tokens}
        return output

    def _max_num_reqs_per_step(self) -> int:
        """A step's share of the requests when several steps are in flight at once."""
        num_reqs = min(len(self.running) + self.num_waiting, self.config.max_num_seqs)
        return max(1, -(-num_reqs // self.config.num_micro_batches))

    def _schedule_running(self, batch: ScheduledBatch) -> None:
        index = 0
        while index < len(self.running) and batch.has_room:
            request = self.running[index]
            num_new_tokens = _num_new_tokens(request, batch.token_budget)
            if num_new_tokens > 0:
                drafts = self._drafts_to_verify(request, num_new_tokens, batch.token_budget)
                num_drafts = self._plan_drafts(request, batch)
                num_lookahead = self.spec.num_lookahead_slots if num_drafts else 0
                num_slots = min(num_new_tokens + len(drafts) + num_lookahead,
                                self.max_model_len - request.num_computed_tokens)
                new_block_ids = self._allocate_or_preempt(request, num_slots)
                if new_block_ids is None:
                    return
                batch.add_cached(request, new_block_ids, num_new_tokens + len(drafts), drafts)
            index += 1

    def _drafts_to_verify(self, request: Request, num_new_tokens: int,
                          token_budget: int) -> list[int]:
        """The request's drafts that fit: it is decoding, and they fit the step's budget, the
        context and its max_tokens (the target adds one token of its own)."""
        if not request.spec_token_ids or num_new_tokens != 1:
            return []
        room = min(token_budget - 1, self.max_model_len - request.num_tokens - 1)
        if request.max_tokens is not None:
            room = min(room, request.max_tokens - request.num_output_tokens - 1)
        return request.spec_token_ids[:max(room, 0)]

    def _plan_drafts(self, request: Request, batch: ScheduledBatch) -> int:
        """How many drafts the runner proposes for the request after this step."""
        if self.spec is None:
            return 0
        num_drafts = self.spec.num_drafts(request.request_id, len(self.running))
        if num_drafts:
            batch.num_draft_tokens[request.request_id] = num_drafts
        return num_drafts

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Blocks for `request`, preempting from the back of `running` until they fit;
        None if `request` itself had to go."""
        while True:
            new_block_ids = self.kv_cache_manager.allocate_slots(request, num_new_tokens)
            if new_block_ids is not None:
                return new_block_ids
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)
        self.finished_req_ids.add(request.request_id)  # the workers drop its state

    def _can_admit(self, batch: ScheduledBatch) -> bool:
        return batch.has_room and len(self.running) < self.config.max_num_seqs

    def _schedule_loaded(self, batch: ScheduledBatch) -> None:
        while self.loaded and self._can_admit(batch):
            request = self.loaded.pop(0)
            num_new_tokens = _num_new_tokens(request, batch.token_budget)
            new_block_ids = self.kv_cache_manager.allocate_slots(request, num_new_tokens)
            assert new_block_ids == [], "a loaded request holds blocks for its whole prompt"
            self._start_running(request, num_new_tokens, batch)

    def _schedule_waiting(self, batch: ScheduledBatch) -> None:
        ask_later = []
        while self.waiting and self._can_admit(batch):
            request = self.waiting.peek()
            admission = self._plan_admission(request, batch.token_budget)
            if admission is None:
                ask_later.append(self.waiting.pop())
                continue
            if not self._allocate_admission(request, admission):
                break  # head-of-line: later requests wait for blocks too
            self.waiting.pop()
            if admission.is_loading_async:
                self.loading[request.request_id] = _Loading(
                    request, admission.num_computed_tokens, admission.num_local_tokens)
                block_size = self.kv_cache_manager.block_size
                self.transfer_stats.on_start(
                    request.request_id, -(-admission.num_computed_tokens // block_size)
                    - admission.num_local_tokens // block_size)
            else:
                request.num_computed_tokens = admission.num_computed_tokens
                self._start_running(request, admission.num_new_tokens, batch)
        for request in reversed(ask_later):
            self.waiting.prepend(request)

    def _plan_admission(self, request: Request, token_budget: int) -> _Admission | None:
        """None when the connector cannot tell yet how many tokens it has."""
        blocks, num_local_tokens = self.kv_cache_manager.get_computed_blocks(request)
        num_external_tokens, is_async = self.connector.get_num_new_matched_tokens(
            request, num_local_tokens
        )
        if num_external_tokens is None:
            return None
        # The last token is always computed here: its logits are needed.
        num_external_tokens = min(num_external_tokens, request.num_tokens - 1 - num_local_tokens)
        num_computed_tokens = num_local_tokens + num_external_tokens
        if is_async and num_external_tokens > 0:
            # Blocks for the whole prompt now, so it never waits for blocks while holding some.
            num_slot_tokens = request.num_tokens - num_local_tokens
            return _Admission(blocks, num_local_tokens, num_computed_tokens, num_external_tokens,
                              num_slot_tokens, 0)
        num_new_tokens = min(request.num_tokens - num_computed_tokens, token_budget)
        num_slot_tokens = num_external_tokens + num_new_tokens
        return _Admission(blocks, num_local_tokens, num_computed_tokens, num_external_tokens,
                          num_slot_tokens, num_new_tokens)

    def _allocate_admission(self, request: Request, admission: _Admission) -> bool:
        new_block_ids = self.kv_cache_manager.allocate_slots(
            request,
            admission.num_slot_tokens,
            admission.computed_blocks,
            delay_cache_blocks=admission.is_loading_async,
        )
        if new_block_ids is None:
            return False
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
        self.connector.update_state_after_alloc(request, block_ids, admission.num_external_tokens)
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = admission.num_computed_tokens
        return True

    def _start_running(self, request: Request, num_new_tokens: int, batch: ScheduledBatch) -> None:
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
        self._plan_drafts(request, batch)
        batch.add_new(request, block_ids, num_new_tokens)

    # ---- the workers' results ----

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append the sampled tokens, finish requests that stopped (freeing their blocks),
        and return one output per request that produced tokens, prompt logprobs or a finish.
        Requests finished, aborted or preempted since the step was scheduled are skipped."""
        sampled = dict(
            zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids, strict=True)
        )
        preemptions = self._in_flight.pop(scheduler_output.step_id, {})
        outputs = []
        for request_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            if preemptions.get(request_id, request.num_preemptions) != request.num_preemptions:
                continue  # preempted while this step ran, and running again since
            token_ids = sampled.get(request_id, [])
            drafts = scheduler_output.scheduled_spec_decode_tokens.get(request_id)
            if drafts:
                self._settle_drafts(request, drafts, len(token_ids))
            request.spec_token_ids = model_runner_output.draft_token_ids.get(request_id, [])
            output = self._update_request(request, token_ids, model_runner_output)
            if output is not None:
                outputs.append(output)
        transfers = model_runner_output.kv_connector_output
        if transfers is not None:
            self.finish_sending(transfers.finished_sending)
            self.finish_receiving(transfers.finished_recving)
            outputs.extend(self.fail_receiving(transfers.failed_recving))
        return outputs

    def _settle_drafts(self, request: Request, drafts: list[int], num_sampled: int) -> None:
        """`num_sampled` - 1 drafts were accepted: the rejected ones' positions are not
        computed after all (their slots are reused by the next tokens; a block holding a
        draft is never cached, since only known tokens are)."""
        num_accepted = num_sampled - 1
        request.num_computed_tokens -= len(drafts) - num_accepted
        self.spec.record(request.request_id, len(drafts), num_accepted)

    def _update_request(
        self, request: Request, token_ids: list[int], runner_output: ModelRunnerOutput
    ) -> EngineCoreOutput | None:
        request_id = request.request_id
        new_token_ids = self._append_tokens(request, token_ids)
        prompt_logprobs = runner_output.prompt_logprobs.get(request_id)
        if not new_token_ids and prompt_logprobs is None:
            return None  # a prompt chunk in the middle of a chunked prefill
        logprobs = runner_output.logprobs.get(request_id)
        transfer_params = None
        if request.is_finished:
            self.running.remove(request)
            transfer_params = self._release(request)
        else:
            self.kv_cache_manager.update_block_hashes(request)
        output = self._finished_output(request, transfer_params)
        output.new_token_ids = new_token_ids
        output.new_logprobs = None if logprobs is None else logprobs[:len(new_token_ids)]
        output.new_prompt_logprobs = prompt_logprobs
        return output

    @staticmethod
    def _finished_output(request: Request,
                         transfer_params: dict[str, Any] | None) -> EngineCoreOutput:
        """The request's output without tokens: its finish (if any) and cache hits."""
        return EngineCoreOutput(
            req_id=request.request_id,
            new_token_ids=[],
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            kv_transfer_params=transfer_params,
        )

    def _append_tokens(self, request: Request, token_ids: list[int]) -> list[int]:
        """Append tokens one at a time, stopping at the first that finishes the request."""
        appended = []
        for token_id in token_ids:
            request.append_output_token_ids([token_id])
            appended.append(token_id)
            if check_stop(request, self.max_model_len):
                break
        return appended

    def _detach(self, request: Request) -> None:
        """Take an unfinished request out of whichever queue holds it."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.request_id in self.loading:
            del self.loading[request.request_id]
            self.transfer_stats.forget(request.request_id)
        elif request in self.loaded:
            self.loaded.remove(request)
        else:
            self.waiting.remove(request)

    def _release(self, request: Request) -> dict[str, Any] | None:
        """Forget a finished request; free its blocks unless the connector still sends them.
        Returns the connector's transfer params for the caller."""
        del self.requests[request.request_id]
        if self.spec is not None:
            self.spec.forget(request.request_id)
        self.finished_req_ids.add(request.request_id)
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
        keep_blocks, transfer_params = self.connector.request_finished(request, block_ids)
        if keep_blocks and block_ids:
            self.sending[request.request_id] = request
        else:
            self.kv_cache_manager.free(request)
        return transfer_params

    # ---- introspection ----

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_loading(self) -> int:
        """Requests waiting for their KV to arrive from elsewhere."""
        return len(self.loading)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.loading) + len(self.loaded)

    def stats(self) -> dict:
        kv = self.kv_cache_manager
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_cache_usage": kv.usage,
            "num_kv_blocks": kv.num_blocks,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "num_preemptions": self.num_preemptions,
            "num_active_leases": len(self.sending),
            "transfers": self.transfer_stats,
            **({} if self.spec is None else {"spec_decode": self.spec.stats}),
        }

    def check_invariants(self) -> None:
        """The KV cache's invariants; exactly the loading, loaded, running and sending
        requests hold blocks, each enough for its computed tokens."""
        self.kv_cache_manager.check_invariants()
        loading = [loading.request for loading in self.loading.values()]
        holders = [*loading, *self.loaded, *self.running, *self.sending.values()]
        assert set(self.kv_cache_manager.req_to_blocks) == {r.request_id for r in holders}, (
            "block holders differ from the loading, loaded, running and sending requests"
        )
        block_size = self.kv_cache_manager.block_size
        for request in self.running:
            num_blocks = len(self.kv_cache_manager.req_to_blocks[request.request_id])
            assert num_blocks * block_size >= request.num_computed_tokens, f"{request} lacks blocks"
