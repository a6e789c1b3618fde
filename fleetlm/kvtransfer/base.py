"""The KV connector seam, split by side: what the scheduler and the workers ask of a connector.

A connector moves KV blocks between engines (disaggregated prefill/decode) or to and from
another store. The scheduler-side half decides *which* tokens come from elsewhere and keeps
blocks alive while they are read; the worker-side half moves the bytes. The scheduler
knows nothing about transports, and nothing here imports torch.

Life of a request on a receiving (decode) engine:
    get_num_new_matched_tokens -> (n, load_async)    n tokens of KV exist elsewhere
    update_state_after_alloc(request, block_ids, n)  blocks are ready for them
    build_connector_meta() -> SchedulerOutput.kv_connector_metadata
    worker: start_load_kv(metadata) ... get_finished() -> KVConnectorOutput:
        finished_recving has the request  -> Scheduler.finish_receiving: it may run
        failed_recving has the request    -> Scheduler.fail_receiving: `failure_policy`
On a sending (prefill) engine:
    request finishes -> request_finished(request, block_ids) -> (True, transfer params):
        the blocks are kept alive, the params go back to the caller with the last output
    worker: get_finished() -> finished_sending has the request (read, or its lease ended)
    Scheduler.finish_sending([...])                  the blocks are freed
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

from fleetlm.executor.outputs import KVConnectorOutput
from fleetlm.executor.request import Request

# What the scheduler does with a request whose asynchronous load failed: compute the tokens
# itself after its valid (local) prefix, or finish it with finish_reason "error".
FailurePolicy = Literal["recompute", "fail"]


class KVConnectorMetadata:
    """What the scheduler-side half tells the worker-side half for one step (a marker base:
    each connector subclasses it; it crosses to the workers in `SchedulerOutput`)."""


class KVConnectorScheduler(ABC):
    """The scheduler's half. Called only from the scheduler's thread."""

    failure_policy: FailurePolicy = "recompute"

    @abstractmethod
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """How many tokens after the first `num_computed_tokens` (local prefix hits) can be
        loaded from elsewhere, and whether they load asynchronously.

        Side-effect free: it may be asked again in a later step for the same request.
        Returns `(None, False)` for "not known yet, ask again next step" (the request then
        stays waiting). With `load_async` False the KV is loaded before the request's first
        forward in the step it is scheduled; with True the request waits, holding blocks for
        its whole prompt, until `Scheduler.finish_receiving` names it. The scheduler may load fewer
        tokens than offered (the last token is always computed locally); the number it
        settles on is passed to `update_state_after_alloc`.
        """

    @abstractmethod
    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """Blocks are allocated: `block_ids` is the request's whole block table; the token
        positions `[n, n + num_external_tokens)` are to be loaded, where n is the number of
        local hits given to `get_num_new_matched_tokens`. Called once for every admitted
        request (again after a preemption), with 0 when nothing is to be loaded."""

    @abstractmethod
    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """The request finished (or was aborted, or failed). Returns `(keep_blocks,
        transfer_params)`: with `keep_blocks` True the scheduler frees the blocks only when
        `Scheduler.finish_sending` names the request (False frees them now);
        `transfer_params` (msgpack-serialisable, or None) go back to the caller with the
        request's last output. Also called for requests that hold no blocks (aborted while
        waiting), with `block_ids` empty. A request whose asynchronous load is still running
        must have it cancelled before this returns: its blocks are freed next."""

    def build_connector_meta(self) -> KVConnectorMetadata | None:
        """This step's instructions for the workers (called at the end of each schedule);
        None when there are none."""
        return None


class KVConnectorWorker(ABC):
    """The workers' half: moves the bytes of the blocks the scheduler-side half picked."""

    @abstractmethod
    def register_kv_caches(self, kv_caches: list[tuple[Any, Any]]) -> None:
        """Called once at start-up with each attention layer's (K, V) tensors, in layer
        order, each shaped (num_blocks, block_size, num_kv_heads, head_dim)."""

    @abstractmethod
    def start_load_kv(self, metadata: KVConnectorMetadata | None) -> None:
        """Start this step's loads, before the forward pass (every step, metadata or not).

        Synchronous loads must be complete when the layer that reads them runs;
        asynchronous ones are reported through `get_finished`.
        """

    @abstractmethod
    def get_finished(self) -> KVConnectorOutput:
        """Transfers that ended since the last call: sends whose blocks may be freed, loads
        that completed, and loads that failed (by request id, with the reason). A failed
        load is never reported as finished: its blocks may hold anything. Never blocks."""


class NoKVConnectorScheduler(KVConnectorScheduler):
    """The connector of an engine that loads nothing from elsewhere and sends nothing."""

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        pass

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return False, None
