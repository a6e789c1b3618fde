"""The decode side's loads: each transfer read in bounded chunks on its own thread.

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
from fleetlm.kvtransfer.params import KVLayout, TransferParams
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
    def __init__(self, kv_caches: KVCaches, layout: KVLayout, connect: Connect,
                 chunk_bytes: int, timeout_s: float, notify: Callable[[], None]) -> None:
        self.kv_caches = kv_caches
        self.layout = layout
        self._connect = connect
        self._chunk_blocks = max(1, chunk_bytes // layout.bytes_per_block)
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
            client = self._connect(params.address, load.time_left())
            try:
                self._read(load, params, client)
                client.release(params.transfer_id, load.time_left())
            finally:
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

    def _read(self, load: _Load, params: TransferParams, client: KVClient) -> None:
        spec = load.spec
        bytes_per_block = self.layout.bytes_per_block
        for start in range(0, len(spec.block_ids), self._chunk_blocks):
            block_ids = spec.block_ids[start:start + self._chunk_blocks]
            data = client.read(params.transfer_id, spec.first_block + start, len(block_ids),
                               len(block_ids) * bytes_per_block, load.time_left())
            with load.lock:
                if load.is_over:
                    return
                scatter_blocks(self.kv_caches, block_ids, data, self.layout)

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
