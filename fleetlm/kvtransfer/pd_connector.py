"""The pull-based prefill/decode connector of one in-process rank (tensor parallel size 1).

A prefill engine's request that asked for it ({"do_remote_decode": True}) finishes with
its blocks kept under a lease (`leases.py`) and returns `TransferParams` naming them; the
engine's KV server (`transport.py`) answers reads of leased blocks. A decode engine's
request carrying those params is admitted with blocks for its whole prompt and loads the
prompt's KV after its own prefix-cache hits asynchronously (`loader.py`); the scheduler
runs it once the load is done, or applies the failure policy when it failed.

Both halves live in the engine's process here, so the scheduler half grants leases and
cancels loads directly; the loads themselves reach the worker half through the step's
metadata, as they would reach remote workers.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

from fleetlm.executor.config import KVTransferConfig
from fleetlm.executor.outputs import KVConnectorOutput
from fleetlm.executor.request import Request, RequestStatus
from fleetlm.kvtransfer.base import KVConnectorScheduler, KVConnectorWorker
from fleetlm.kvtransfer.kv_io import KVCaches, gather_blocks, layout_of
from fleetlm.kvtransfer.leases import LeaseTable
from fleetlm.kvtransfer.loader import KVLoader
from fleetlm.kvtransfer.metadata import LoadSpec, PDConnectorMetadata
from fleetlm.kvtransfer.params import (
    DO_REMOTE_DECODE,
    KVLayout,
    TransferParams,
    tokens_hash,
)
from fleetlm.kvtransfer.transport import connect, serve


class LeasedKV:
    """What the KV server serves: the leased blocks of this rank's cache."""

    def __init__(self, leases: LeaseTable, kv_caches: KVCaches) -> None:
        self.leases = leases
        self.kv_caches = kv_caches

    def read(self, transfer_id: str, first_block: int, num_blocks: int) -> bytes:
        return self.leases.read(transfer_id, first_block, num_blocks,
                                lambda block_ids: gather_blocks(self.kv_caches, block_ids))

    def release(self, transfer_id: str) -> None:
        self.leases.release(transfer_id)


class PDConnectorScheduler(KVConnectorScheduler):
    def __init__(self, config: KVTransferConfig, engine_id: str, address: str,
                 layout: KVLayout, leases: LeaseTable | None, loader: KVLoader | None) -> None:
        self.failure_policy = config.failure_policy
        self.engine_id = engine_id
        self.address = address
        self.layout = layout
        self.leases = leases  # None: not a producer
        self.loader = loader  # None: not a consumer
        self._num_local_tokens: dict[str, int] = {}  # as last asked
        self._is_tried: set[str] = set()  # requests whose transfer was started or skipped
        self._new_loads: list[LoadSpec] = []

    def _remote(self, request: Request) -> TransferParams | None:
        """The transfer a consumer still has to start for the request, if any."""
        params = request.kv_transfer_params
        if self.loader is None or not params or DO_REMOTE_DECODE in params or \
                request.request_id in self._is_tried:
            return None
        return TransferParams.from_dict(params)  # checked when the request was added

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        remote = self._remote(request)
        if remote is None or remote.num_tokens > request.num_tokens or \
                tokens_hash(request.all_token_ids[:remote.num_tokens]) != remote.tokens_hash or \
                request.sampling_params.prompt_logprobs is not None:
            # A foreign prompt's KV is never loaded (its lease still ends), nor KV for a
            # request that needs every prompt position computed here (prompt logprobs).
            return 0, False
        self._num_local_tokens[request.request_id] = num_computed_tokens
        num_external_tokens = remote.num_tokens - num_computed_tokens
        return (num_external_tokens, True) if num_external_tokens > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, block_ids: list[int],
                                 num_external_tokens: int) -> None:
        if self._remote(request) is None:
            return
        self._is_tried.add(request.request_id)
        first = last = 0
        if num_external_tokens:
            block_size = self.layout.block_size
            num_local_tokens = self._num_local_tokens[request.request_id]
            first = num_local_tokens // block_size
            last = -(-(num_local_tokens + num_external_tokens) // block_size)
        self._new_loads.append(LoadSpec(request.request_id, request.kv_transfer_params,
                                        first, block_ids[first:last]))

    def build_connector_meta(self) -> PDConnectorMetadata | None:
        if not self._new_loads:
            return None
        loads, self._new_loads = self._new_loads, []
        return PDConnectorMetadata(loads)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        self._is_tried.discard(request_id)
        self._num_local_tokens.pop(request_id, None)
        if self.loader is not None:
            self.loader.cancel(request_id)
        params = request.kv_transfer_params or {}
        if self.leases is None or not params.get(DO_REMOTE_DECODE) or not block_ids or \
                request.status not in (RequestStatus.FINISHED_STOPPED,
                                       RequestStatus.FINISHED_LENGTH):
            return False, None
        num_tokens = request.num_computed_tokens
        transfer_id, deadline = self.leases.grant(request_id, block_ids)
        return True, TransferParams(
            transfer_id, self.engine_id, self.address, tuple(block_ids), num_tokens, deadline,
            self.layout, tokens_hash(request.all_token_ids[:num_tokens])).to_dict()


class PDConnectorWorker(KVConnectorWorker):
    def __init__(self, leases: LeaseTable | None, loader: KVLoader | None,
                 on_read: Callable[[], None]) -> None:
        self.leases = leases
        self.loader = loader
        self._on_read = on_read  # the news so far is being collected

    def register_kv_caches(self, kv_caches: KVCaches) -> None:
        if self.loader is not None:
            self.loader.kv_caches = kv_caches

    def start_load_kv(self, metadata: PDConnectorMetadata | None) -> None:
        for spec in metadata.loads if metadata is not None else ():
            self.loader.start(spec)

    def get_finished(self) -> KVConnectorOutput:
        self._on_read()
        done, failed = self.loader.drain() if self.loader is not None else (set(), {})
        sent = self.leases.drain_finished() if self.leases is not None else set()
        return KVConnectorOutput(finished_sending=sent, finished_recving=done,
                                 failed_recving=failed)


class PDConnector:
    """Both halves, the KV server and the transfer news of one in-process rank's engine.

    `wait_for_news` blocks the engine thread until a lease ends or a load ends (or `wake`),
    so an engine with nothing to do but wait for transfers neither spins nor sleeps.
    """

    def __init__(self, config: KVTransferConfig, kv_caches: KVCaches) -> None:
        self.config = config
        self.engine_id = config.engine_id or uuid.uuid4().hex[:12]
        self.layout = layout_of(kv_caches)
        self._news = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        is_producer = config.role in ("producer", "both")
        is_consumer = config.role in ("consumer", "both")
        self.leases = LeaseTable(config.lease_timeout_s, self._notify) if is_producer else None
        self.server = serve(config.transport, LeasedKV(self.leases, kv_caches), config.host,
                            config.port) if is_producer else None
        self.loader = KVLoader(kv_caches, self.layout, connect, config.chunk_bytes,
                               config.transfer_timeout_s, self._notify) if is_consumer else None
        self.scheduler = PDConnectorScheduler(
            config, self.engine_id, self.server.address if self.server else "", self.layout,
            self.leases, self.loader)
        self.worker = PDConnectorWorker(self.leases, self.loader, self._news.clear)
        self.worker.register_kv_caches(kv_caches)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called (from any thread) whenever there is transfer news."""
        self._listeners.append(listener)

    def has_news(self) -> bool:
        return self._news.is_set()

    def wait_for_news(self) -> None:
        self._news.wait()

    def wake(self) -> None:
        self._news.set()

    @property
    def num_active_leases(self) -> int:
        return self.leases.num_active if self.leases is not None else 0

    @property
    def num_active_loads(self) -> int:
        return self.loader.num_active if self.loader is not None else 0

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.leases.close()
        if self.loader is not None:
            self.loader.close()

    def _notify(self) -> None:
        self._news.set()
        for listener in self._listeners:
            listener()
