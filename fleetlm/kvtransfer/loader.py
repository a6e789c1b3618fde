"""The decode side's loads, on each rank: each transfer read in bounded chunks on its own
thread, from every prefill rank that holds part of this rank's layers and heads (`plan.py`).

A load ends exactly once: done (every chunk written, the lease released), failed (a
TransferError, or its timeout passed: a timer fails it even when a read never returns), or
cancelled (its request is gone). Chunks are written into the cache under the load's lock
and only while it has not ended, so once `cancel` or a failure returns, nothing more is
written into blocks that the scheduler may now hand to another request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetlm.kvtransfer.kv_io import KVCaches, scatter_blocks
from fleetlm.kvtransfer.leases import TransferError
from fleetlm.kvtransfer.metadata import LoadSpec
from fleetlm.kvtransfer.params import KVLayout, KVShard, TransferParams
from fleetlm.kvtransfer.plan import ReadPlan, plan_reads
from fleetlm.kvtransfer.transport import KVClient

logger = logging.getLogger("fleetlm.kvtransfer")

Connect = Callable[[str, float], KVClient]


@dataclass
class _Load:
    spec: LoadSpec
    deadline: float  # monotonic
    lock: threading.Lock = field(default_factory=threading.Lock)
    is_over: bool = False
    timer: threading.Timer | None = None

    def time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TransferError("timeout", "the transfer took too long")
        return left


class KVLoader:
    """One rank's loads. `layout` is the engine's (all ranks'); `group` every rank's shard
    (in rank order), `rank` this one's: a transfer's plan depends on all of them."""

    def __init__(self, kv_caches: KVCaches, layout: KVLayout, group: list[KVShard], rank: int,
                 connect: Connect, chunk_bytes: int, timeout_s: float,
                 notify: Callable[[], None]) -> None:
        self.kv_caches = kv_caches
        self.layout = layout
        self.group, self.rank = group, rank
        self._connect = connect
        self._chunk_bytes = chunk_bytes
        self._timeout_s = timeout_s
        self._notify = notify  # a load ended
        self._loads: dict[str, _Load] = {}
        self._done: set[str] = set()
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()

    def start(self, spec: LoadSpec) -> None:
        load = _Load(spec, time.monotonic() + self._timeout_s)
        if spec.block_ids:
            with self._lock:
                self._loads[spec.req_id] = load
            load.timer = threading.Timer(self._timeout_s, self._end, (load, "timeout"))
            load.timer.daemon = True
            load.timer.start()
        threading.Thread(target=self._run, args=(load,), name="fleetlm-kv-load",
                         daemon=True).start()

    def cancel(self, req_id: str) -> None:
        """Stop the request's load, if any, without reporting it; no byte is written after."""
        with self._lock:
            load = self._loads.pop(req_id, None)
            self._done.discard(req_id)  # ended, not yet reported: never reported now
            self._failed.pop(req_id, None)
        if load is not None:
            with load.lock:
                load.is_over = True
            load.timer.cancel()

    def drain(self) -> tuple[set[str], dict[str, str]]:
        """Loads done and failed since the last call."""
        with self._lock:
            done, failed = self._done, self._failed
            self._done, self._failed = set(), {}
        return done, failed

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._loads)

    def close(self) -> None:
        for req_id in list(self._loads):
            self.cancel(req_id)

    def _run(self, load: _Load) -> None:
        spec = load.spec
        try:
            params = TransferParams.from_dict(spec.transfer_params)
            if params.layout != self.layout:
                raise TransferError("layout_mismatch", f"{params.layout} != {self.layout}")
            plan = plan_reads(params.ranks, self.group, self.rank)
            clients: dict[int, KVClient] = {}
            try:
                self._read(load, params, plan, clients)
                for release in plan.releases:
                    self._client(clients, params, release.source, load).release(
                        params.transfer_id, load.time_left(), release.reader,
                        release.num_readers)
            finally:
                for client in clients.values():
                    client.close()
            error = None
        except TransferError as e:
            error = str(e)
        except Exception as e:
            logger.exception("KV load of %s failed", spec.req_id)
            error = f"internal: {e!r}"
        if spec.block_ids:
            self._end(load, error)
        elif error is not None:
            logger.info("releasing the unneeded KV of %s failed: %s", spec.req_id, error)

    def _client(self, clients: dict[int, KVClient], params: TransferParams, source: int,
                load: _Load) -> KVClient:
        if source not in clients:
            clients[source] = self._connect(params.ranks[source].address, load.time_left())
        return clients[source]

    def _read(self, load: _Load, params: TransferParams, plan: ReadPlan,
              clients: dict[int, KVClient]) -> None:
        spec, mine = load.spec, self.group[self.rank]
        for piece in plan.pieces if spec.block_ids else ():
            source = params.ranks[piece.source]
            client = self._client(clients, params, piece.source, load)
            bytes_per_block = self.layout.bytes_per_block(piece.layers[1] - piece.layers[0],
                                                          piece.heads[1] - piece.heads[0])
            chunk_blocks = max(1, self._chunk_bytes // bytes_per_block)
            for start in range(0, len(spec.block_ids), chunk_blocks):
                block_ids = spec.block_ids[start:start + chunk_blocks]
                data = client.read(params.transfer_id, spec.first_block + start,
                                   len(block_ids), len(block_ids) * bytes_per_block,
                                   load.time_left(), _local(piece.layers, source.layers),
                                   _local(piece.heads, source.heads))
                with load.lock:
                    if load.is_over:
                        return
                    scatter_blocks(self.kv_caches, block_ids, data,
                                   _local(piece.layers, mine.layers),
                                   _local(piece.heads, mine.heads))

    def _end(self, load: _Load, error: str | None) -> None:
        with load.lock:
            if load.is_over:
                return
            load.is_over = True
        load.timer.cancel()
        req_id = load.spec.req_id
        with self._lock:
            if self._loads.get(req_id) is not load:
                return
            del self._loads[req_id]
            if error is None:
                self._done.add(req_id)
            else:
                logger.warning("KV load of %s failed: %s", req_id, error)
                self._failed[req_id] = error
        self._notify()


def _local(part: tuple[int, int], held: tuple[int, int]) -> tuple[int, int]:
    """`part` (engine-wide indices) within what a rank holds, `held`."""
    return part[0] - held[0], part[1] - held[0]
