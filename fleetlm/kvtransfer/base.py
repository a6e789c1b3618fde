"""The KV connector seam, split by side: what the scheduler and the workers ask of a connector.

A connector moves KV blocks between engines (disaggregated prefill/decode) or to and from
another store. The scheduler-side half decides *which* tokens come from elsewhere and keeps
blocks alive while they are sent; the worker-side half moves the bytes. The scheduler
knows nothing about transports, and nothing here imports torch.

Life of a request on a receiving (decode) engine:
    get_num_new_matched_tokens -> (n, load_async)    n tokens of KV exist elsewhere
    update_state_after_alloc(request, block_ids, n)  blocks are ready for them
    worker: start_load_kv ... get_finished() -> finished_recving has the request
    scheduler.finish_receiving([...])                (async loads only) now it may run
On a sending (prefill) engine:
    request finishes -> request_finished(request, block_ids) -> True: blocks kept alive
    worker: save_kv_layer ... get_finished() -> finished_sending has the request
    scheduler.finish_sending([...])                  the blocks are freed
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from fleetlm.executor.request import Request


class KVConnectorMetadata:
    """What the scheduler-side half tells the worker-side half for one step (a marker base:
    each connector subclasses it)."""


class KVConnectorScheduler(ABC):
    """The scheduler's half. Called only from the scheduler's thread."""

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
    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        """The request finished (or was aborted). Return True to keep its blocks alive while
        they are sent elsewhere; the scheduler then frees them only when
        `Scheduler.finish_sending` names the request. False frees them now. Also called
        for requests that hold no blocks (aborted while waiting), with `block_ids` empty."""


class KVConnectorWorker(ABC):
    """The workers' half: moves the bytes of the blocks the scheduler-side half picked."""

    @abstractmethod
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Called once at start-up with each attention layer's KV tensor, by layer name."""

    @abstractmethod
    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        """Start loading this step's incoming blocks, before the forward pass.

        Synchronous loads must be complete when the layer that reads them runs;
        asynchronous ones are reported through `get_finished`.
        """

    @abstractmethod
    def save_kv_layer(self, layer_name: str, kv_layer: Any, metadata: KVConnectorMetadata) -> None:
        """Called after each attention layer wrote its KV: start sending what must leave."""

    @abstractmethod
    def get_finished(self) -> tuple[set[str], set[str]]:
        """`(finished_sending, finished_recving)`: request ids whose transfers completed (or
        failed, and will not complete) since the last call. Never blocks."""


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

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        return False
