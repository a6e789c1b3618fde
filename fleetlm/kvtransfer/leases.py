"""The prefill side's leases: a finished request's blocks, kept for one reader for a while.

A lease is granted on each rank of a prefill engine when a request finishes there (the
grant travels to the ranks with the next step, under a transfer id the engine made;
`new_transfer_id` numbers them in order, so a read that arrives before its grant waits for
it instead of being refused as unknown), renewed by each read, and ends when every reader
has released it (consumed: a decode engine split differently may have several ranks
reading one prefill rank) or when its deadline passes (expired; a reaper thread scans every
lease at the earliest deadline). Either way its request id comes out of
`drain_finished` exactly once, and only then are its blocks freed. Reads of an unknown,
ended or out-of-range transfer are refused with the reason; bytes are only ever read under
the lock, from a live lease, so a read can never see blocks that were freed. No torch here.

    granted ──read (renews)──> granted ──release──> consumed ─┐
       │                                                        ├─> drain_finished: freed
       └──────────deadline passed (reaper, or a read)──> expired ┘
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

_NUM_TOMBSTONES = 4096  # ended transfers remembered, to name why a late read is refused
GRANT_WAIT_S = 60.0  # how long a read waits for a grant still on its way (one engine step)
MAX_READERS = 1024


def new_transfer_id(seq: int) -> str:
    """The seq-th transfer id of an engine: in order, and not guessable."""
    return f"{seq}.{secrets.token_hex(8)}"


def _seq_of(transfer_id: str) -> int | None:
    seq, _, _ = transfer_id.partition(".")
    return int(seq) if seq.isdigit() else None


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
    readers: set[int] = field(default_factory=set)  # those that released it


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
        self._last_granted = 0  # the highest transfer id number granted
        self._cond = threading.Condition()
        self._is_closed = False
        self._reaper = threading.Thread(target=self._reap_forever, name="fleetlm-kv-leases",
                                        daemon=True)
        self._reaper.start()

    def grant(self, request_id: str, transfer_id: str, block_ids: list[int]) -> None:
        """A new lease on the blocks under `transfer_id` (from `new_transfer_id`)."""
        with self._cond:
            self._leases[transfer_id] = _Lease(
                request_id, list(block_ids), self._clock() + self.lease_timeout_s)
            self._last_granted = max(self._last_granted, _seq_of(transfer_id) or 0)
            self._cond.notify_all()

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

    def release(self, transfer_id: str, reader: int = 0, num_readers: int = 1) -> None:
        """Reader `reader` of `num_readers` has everything; once every reader has, the
        blocks may be freed. Refused like a read."""
        if not 0 <= reader < num_readers <= MAX_READERS:
            raise TransferError("bad_request", f"reader {reader} of {num_readers}")
        with self._cond:
            lease = self._live(transfer_id)
            lease.readers.add(reader)
            if len(lease.readers) >= num_readers:
                self._end(transfer_id, lease, "consumed")

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
        seq = _seq_of(transfer_id)
        if seq is not None and seq > self._last_granted:  # its grant is on its way
            self._cond.wait_for(lambda: seq <= self._last_granted or self._is_closed,
                                GRANT_WAIT_S)
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
