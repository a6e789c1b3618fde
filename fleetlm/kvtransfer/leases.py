"""The prefill side's leases: a finished request's blocks, kept for one reader for a while.

A lease is granted when a request finishes on a prefill engine, renewed by each read, and
ends when the reader releases it (consumed) or when its deadline passes (expired; a reaper
thread scans every lease at the earliest deadline). Either way its request id comes out of
`drain_finished` exactly once, and only then are its blocks freed. Reads of an unknown,
ended or out-of-range transfer are refused with the reason; bytes are only ever read under
the lock, from a live lease, so a read can never see blocks that were freed. No torch here.

    granted ──read (renews)──> granted ──release──> consumed ─┐
       │                                                        ├─> drain_finished: freed
       └──────────deadline passed (reaper, or a read)──> expired ┘
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

_NUM_TOMBSTONES = 4096  # ended transfers remembered, to name why a late read is refused


class TransferError(Exception):
    """A transfer that cannot go on. `reason` is a short code: unknown, expired, consumed,
    out_of_range (refused by the prefill side), timeout, unreachable, corrupt,
    layout_mismatch, bad_request."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


@dataclass
class _Lease:
    request_id: str
    block_ids: list[int]
    deadline: float  # monotonic


class LeaseTable:
    """Thread-safe: the engine thread grants and drains, server threads read and release."""

    def __init__(self, lease_timeout_s: float, notify: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_timeout_s = lease_timeout_s
        self._clock = clock
        self._notify = notify  # a lease ended: its blocks may be freed
        self._leases: dict[str, _Lease] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # transfer id -> how it ended
        self._finished: set[str] = set()  # request ids whose blocks may be freed
        self._cond = threading.Condition()
        self._is_closed = False
        self._reaper = threading.Thread(target=self._reap_forever, name="fleetlm-kv-leases",
                                        daemon=True)
        self._reaper.start()

    def grant(self, request_id: str, block_ids: list[int]) -> tuple[str, float]:
        """A new lease on the blocks: (transfer id, deadline as Unix time)."""
        transfer_id = uuid.uuid4().hex
        with self._cond:
            self._leases[transfer_id] = _Lease(
                request_id, list(block_ids), self._clock() + self.lease_timeout_s)
            self._cond.notify()
        return transfer_id, time.time() + self.lease_timeout_s

    def read(self, transfer_id: str, first_block: int, num_blocks: int,
             gather: Callable[[list[int]], bytes]) -> bytes:
        """`gather` of the lease's blocks [first_block, first_block + num_blocks), run under
        the lock; renews the lease. Raises TransferError when refused."""
        with self._cond:
            lease = self._live(transfer_id)
            if not (0 <= first_block and 0 < num_blocks
                    and first_block + num_blocks <= len(lease.block_ids)):
                raise TransferError("out_of_range", f"blocks [{first_block}, "
                                    f"{first_block + num_blocks}) of {len(lease.block_ids)}")
            lease.deadline = self._clock() + self.lease_timeout_s
            return gather(lease.block_ids[first_block:first_block + num_blocks])

    def release(self, transfer_id: str) -> None:
        """The reader has everything: the blocks may be freed. Refused like a read."""
        with self._cond:
            self._end(transfer_id, self._live(transfer_id), "consumed")

    def reap(self) -> None:
        """End every lease whose deadline has passed (all of them, not just the oldest)."""
        now = self._clock()
        with self._cond:
            for transfer_id, lease in list(self._leases.items()):
                if lease.deadline <= now:
                    self._end(transfer_id, lease, "expired")

    def drain_finished(self) -> set[str]:
        """Request ids whose leases ended since the last call."""
        with self._cond:
            finished, self._finished = self._finished, set()
        return finished

    @property
    def num_active(self) -> int:
        with self._cond:
            return len(self._leases)

    def close(self) -> None:
        with self._cond:
            self._is_closed = True
            self._cond.notify()
        self._reaper.join()

    def _live(self, transfer_id: str) -> _Lease:
        lease = self._leases.get(transfer_id)
        if lease is not None and lease.deadline <= self._clock():
            self._end(transfer_id, lease, "expired")
            lease = None
        if lease is None:
            raise TransferError(self._ended.get(transfer_id, "unknown"),
                                f"transfer {transfer_id!r}")
        return lease

    def _end(self, transfer_id: str, lease: _Lease, how: str) -> None:
        del self._leases[transfer_id]
        self._ended[transfer_id] = how
        while len(self._ended) > _NUM_TOMBSTONES:
            self._ended.popitem(last=False)
        self._finished.add(lease.request_id)
        self._notify()

    def _reap_forever(self) -> None:
        with self._cond:
            while not self._is_closed:
                deadlines = [lease.deadline for lease in self._leases.values()]
                timeout = max(0.0, min(deadlines) - self._clock()) if deadlines else None
                self._cond.wait(timeout)
                self.reap()  # the Condition's lock is reentrant
