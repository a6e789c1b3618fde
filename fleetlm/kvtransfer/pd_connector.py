"""The pull-based prefill/decode connector, for one in-process rank or a worker group.

A prefill engine's request that asked for it ({"do_remote_decode": True}) finishes with
its blocks kept under a lease on every rank (`leases.py`) and returns `TransferParams`
naming them and, for every rank, its KV server (`transport.py`) and the layers and KV heads
it holds. A decode engine's request carrying those params is admitted with blocks for its
whole prompt; each of its ranks loads the part of the prompt's KV it holds, after its own
prefix-cache hits, asynchronously (`loader.py`, `plan.py`: the two engines may split their
KV differently); the scheduler runs it once every rank has its part, or applies the failure
policy when one rank's part failed.

The scheduler half (`PDConnectorScheduler`) lives in the engine's process; the worker half
(`PDConnectorWorker`: leases, KV server, loader) in each rank's. Everything the scheduler
half decides (lease grants, loads, cancels) reaches every rank in the step's metadata; the
ranks' news comes back in the step results (`group.RankReports` puts a worker group's
together). `PDConnector` is the engine's handle: its news wakes an engine waiting for
transfers (a rank in another process tells it over its link to the engine).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fleetlm.executor.config import KVTransferConfig
from fleetlm.executor.outputs import KVConnectorOutput
from fleetlm.executor.request import Request, RequestStatus
from fleetlm.kvtransfer.base import KVConnectorScheduler, KVConnectorWorker
from fleetlm.kvtransfer.group import RankReports
from fleetlm.kvtransfer.kv_io import KVCaches, Range, gather_blocks, layout_of
from fleetlm.kvtransfer.leases import LeaseTable, TransferError, new_transfer_id
from fleetlm.kvtransfer.loader import KVLoader
from fleetlm.kvtransfer.metadata import LeaseGrant, LoadSpec, PDConnectorMetadata
from fleetlm.kvtransfer.params import (
    DO_REMOTE_DECODE,
    KVLayout,
    KVShard,
    TransferParams,
    tokens_hash,
)
from fleetlm.kvtransfer.transport import connect, serve


class LeasedKV:
    """What a rank's KV server serves: the leased blocks of its cache."""

    def __init__(self, leases: LeaseTable, kv_caches: KVCaches) -> None:
        self.leases = leases
        self.kv_caches = kv_caches

    def read(self, transfer_id: str, first_block: int, num_blocks: int,
             layers: Range | None = None, heads: Range | None = None, out=None):
        _, _, num_heads, _ = self.kv_caches[0][0].shape
        for part, limit in ((layers, len(self.kv_caches)), (heads, num_heads)):
            if part is not None and not 0 <= part[0] < part[1] <= limit:
                raise TransferError("out_of_range", f"[{part[0]}, {part[1]}) of {limit}")
        return self.leases.read(transfer_id, first_block, num_blocks, lambda block_ids:
                                gather_blocks(self.kv_caches, block_ids, layers, heads, out))

    def release(self, transfer_id: str, reader: int = 0, num_readers: int = 1) -> None:
        self.leases.release(transfer_id, reader, num_readers)


class PDConnectorScheduler(KVConnectorScheduler):
    """`ranks`: the engine's ranks' shards with their KV servers; `reports`: a worker
    group's (None for one in-process rank); `notify`: a lease to grant is waiting for a
    step to carry it."""

    def __init__(self, config: KVTransferConfig, engine_id: str, ranks: tuple[KVShard, ...],
                 layout: KVLayout, reports: RankReports | None,
                 notify: Callable[[], None]) -> None:
        self.failure_policy = config.failure_policy
        self.is_producer = config.role in ("producer", "both")
        self.is_consumer = config.role in ("consumer", "both")
        self.lease_timeout_s = config.lease_timeout_s
        self.engine_id = engine_id
        self.ranks = ranks
        self.layout = layout
        self.reports = reports
        self._notify = notify
        self._num_local_tokens: dict[str, int] = {}  # as last asked
        self._is_tried: set[str] = set()  # requests whose transfer was started or skipped
        self._num_grants = 0
        self._meta = PDConnectorMetadata()

    def _remote(self, request: Request) -> TransferParams | None:
        """The transfer a consumer still has to start for the request, if any."""
        params = request.kv_transfer_params
        if not self.is_consumer or not params or DO_REMOTE_DECODE in params or \
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
        self._meta.loads.append(LoadSpec(request.request_id, request.kv_transfer_params,
                                         first, block_ids[first:last]))

    def build_connector_meta(self) -> PDConnectorMetadata | None:
        if self.reports is not None:
            self._meta.cancels.extend(self.reports.take_cancels())
        meta = self._meta
        if not (meta.loads or meta.grants or meta.cancels):
            return None
        self._meta = PDConnectorMetadata()
        return meta

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        if request_id in self._is_tried:  # its load, if still running, stops on every rank
            self._is_tried.discard(request_id)
            self._meta.cancels.append(request_id)
            if self.reports is not None:
                self.reports.forget(request_id)
            self._notify()  # a step carries the cancel now, not with the next request
        self._num_local_tokens.pop(request_id, None)
        params = request.kv_transfer_params or {}
        if not self.is_producer or not params.get(DO_REMOTE_DECODE) or not block_ids or \
                request.status not in (RequestStatus.FINISHED_STOPPED,
                                       RequestStatus.FINISHED_LENGTH):
            return False, None
        num_tokens = request.num_computed_tokens
        self._num_grants += 1
        transfer_id = new_transfer_id(self._num_grants)
        self._meta.grants.append(LeaseGrant(request_id, transfer_id, list(block_ids)))
        self._notify()  # the grant needs a step to reach the ranks
        return True, TransferParams(
            transfer_id, self.engine_id, self.ranks, tuple(block_ids), num_tokens,
            time.time() + self.lease_timeout_s, self.layout,
            tokens_hash(request.all_token_ids[:num_tokens])).to_dict()


class PDConnectorWorker(KVConnectorWorker):
    """One rank's half: its leases and KV server (producer), its loader (consumer).
    `notify` is called when a lease or a load ended, once until the next `get_finished`."""

    def __init__(self, config: KVTransferConfig, kv_caches: KVCaches, shard: KVShard,
                 rank: int, notify: Callable[[], None],
                 on_collect: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.rank = rank
        self.kv_caches = kv_caches
        self._notify = notify
        self._on_collect = on_collect  # the news so far is being collected
        self._has_told = False
        self._lock = threading.Lock()
        self.local_layout = layout_of(kv_caches)
        self.leases = self.server = self.loader = None
        address = ""
        if config.role in ("producer", "both"):
            self.leases = LeaseTable(config.lease_timeout_s, self._tell)
            port = config.port + rank if config.port else 0
            self.server = serve(config.transport, LeasedKV(self.leases, kv_caches),
                                config.host, port)
            address = self.server.address
        self.shard = replace(shard, address=address)

    def join(self, group: list[KVShard]) -> None:
        """Every rank's shard (rank order): a consumer plans its reads with them."""
        if self.config.role in ("consumer", "both"):
            self.loader = KVLoader(self.kv_caches, engine_layout(self.local_layout, group),
                                   group, self.rank, connect, self.config.chunk_bytes,
                                   self.config.transfer_timeout_s, self._tell)

    def register_kv_caches(self, kv_caches: KVCaches) -> None:
        self.kv_caches = kv_caches

    def start_load_kv(self, metadata: PDConnectorMetadata | None) -> None:
        if metadata is None:
            return
        for req_id in metadata.cancels:
            if self.loader is not None:
                self.loader.cancel(req_id)
        for grant in metadata.grants:
            self.leases.grant(grant.req_id, grant.transfer_id, grant.block_ids)
        for spec in metadata.loads:
            self.loader.start(spec)

    def get_finished(self) -> KVConnectorOutput:
        self._on_collect()
        with self._lock:
            self._has_told = False
        done, failed = self.loader.drain() if self.loader is not None else (set(), {})
        sent = self.leases.drain_finished() if self.leases is not None else set()
        return KVConnectorOutput(finished_sending=sent, finished_recving=done,
                                 failed_recving=failed)

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

    def _tell(self) -> None:
        with self._lock:
            if self._has_told:
                return
            self._has_told = True
        self._notify()


def engine_layout(local: KVLayout, group: list[KVShard]) -> KVLayout:
    """The engine's whole layout from one rank's and every rank's shard."""
    return replace(local, num_layers=max(s.layers[1] for s in group),
                   num_kv_heads=max(s.heads[1] for s in group))


class PDConnector:
    """The engine's handle on the connector: the scheduler half, the transfer news, and the
    ranks' worker halves (through `_ranks`: one in this process, or a worker group's).

    `wait_for_news` blocks the engine thread until a lease or a load ended on some rank, or
    a grant waits for a step (or `wake`), so an engine with nothing to do but wait for
    transfers neither spins nor sleeps. The news is cleared when the next step is sent
    (`step_sent`): whatever a rank had to tell by then, that step collects.
    """

    def __init__(self, config: KVTransferConfig, ranks: list[tuple[KVShard, KVLayout]],
                 reports: RankReports | None, count: Callable[[str], int],
                 close: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.close = close  # what ends the ranks' halves (a worker group's end with it)
        self.engine_id = config.engine_id or uuid.uuid4().hex[:12]
        shards = [shard for shard, _ in ranks]
        self.layout = engine_layout(ranks[0][1], shards)
        self.reports = reports
        self._count = count  # attribute name -> its sum over the ranks
        self._news = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self.scheduler = PDConnectorScheduler(config, self.engine_id, tuple(shards),
                                              self.layout, reports, self.notify)

    @classmethod
    def in_process(cls, config: KVTransferConfig, runner) -> PDConnector:
        """For a `LocalExecutor`'s one rank (its `ModelRunner`)."""
        engine: list[PDConnector] = []  # the worker's news goes to the engine's handle
        worker = PDConnectorWorker(config, runner.kv_caches, runner.kv_shard, 0,
                                   lambda: engine[0].notify(), lambda: engine[0].step_sent())
        worker.join([worker.shard])
        engine.append(cls(config, [(worker.shard, worker.local_layout)], None,
                          lambda name: getattr(worker, name), worker.close))
        runner.kv_connector = worker
        return engine[0]

    def step_sent(self) -> None:
        self._news.clear()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called (from any thread) whenever there is transfer news."""
        self._listeners.append(listener)

    def has_news(self) -> bool:
        return self._news.is_set()

    def wait_for_news(self) -> None:
        self._news.wait()

    def wake(self) -> None:
        self._news.set()

    def notify(self) -> None:
        self._news.set()
        for listener in self._listeners:
            listener()

    @property
    def num_active_leases(self) -> int:
        return self._count("num_active_leases")

    @property
    def num_active_loads(self) -> int:
        return self._count("num_active_loads")
