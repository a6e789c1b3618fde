"""KV events: what a replica's prefix cache gained and lost, for a router to mirror.

The block pool reports, in order, every block that became cached (`BlockStored`), every
cached block that was evicted (`BlockRemoved`) and a reset of the whole cache
(`AllBlocksCleared`). The engine closes one `KVEventBatch` per step (`end_step`), numbered
1, 2, 3... by `seq`; steps that changed nothing take no number. A consumer asks
`since(engine_id, seq)` for everything after the last batch it applied and gets either those
batches or, when it cannot be answered from the bounded ring (the batches were dropped, the
consumer is new, or the engine is another one: a restarted replica has a new `engine_id`),
a snapshot: every cached block hash with its parent, current at `seq`. Either way the
consumer's view after applying the reply equals the cache after batch `seq`.

Threads: the pool's calls and `end_step` come from the engine thread, `since` from any other;
one lock guards what they share. Replies are dicts of ints, strings and lists, so they travel
over Ray and msgpack as they are. No torch here.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

DEFAULT_MAX_BATCHES = 1024  # about a few seconds of busy steps; older asks get a snapshot


@dataclass(frozen=True)
class BlockStored:
    """Consecutive blocks of one prefix became cached: `block_hashes[0]`'s parent is
    `parent_hash` (None: it starts a prompt), each next one's parent is the one before."""

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: tuple[tuple[int, ...], ...]  # each block's tokens, as the pool keeps them

    def to_wire(self) -> list:
        return ["stored", list(self.block_hashes), self.parent_hash,
                [list(tokens) for tokens in self.token_ids]]


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]

    def to_wire(self) -> list:
        return ["removed", list(self.block_hashes)]


@dataclass(frozen=True)
class AllBlocksCleared:
    def to_wire(self) -> list:
        return ["cleared"]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def event_from_wire(wire: Sequence) -> KVEvent:
    kind = wire[0]
    if kind == "stored":
        return BlockStored(tuple(wire[1]), wire[2], tuple(tuple(t) for t in wire[3]))
    if kind == "removed":
        return BlockRemoved(tuple(wire[1]))
    if kind == "cleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event kind {kind!r}")


@dataclass(frozen=True)
class KVEventBatch:
    seq: int
    events: tuple[KVEvent, ...]

    def to_wire(self) -> list:
        return [self.seq, [event.to_wire() for event in self.events]]

    @classmethod
    def from_wire(cls, wire: Sequence) -> KVEventBatch:
        return cls(wire[0], tuple(event_from_wire(event) for event in wire[1]))


def apply_event(blocks: dict[int, int | None], event: KVEvent) -> tuple[list[int], list[int]]:
    """Apply one event to a map block hash -> parent hash (a replica's cached blocks);
    returns the hashes it added and those it removed."""
    if isinstance(event, BlockStored):
        added, parent = [], event.parent_hash
        for block_hash in event.block_hashes:
            if block_hash not in blocks:
                added.append(block_hash)
            blocks[block_hash] = parent
            parent = block_hash
        return added, []
    if isinstance(event, BlockRemoved):
        removed = [h for h in event.block_hashes if h in blocks]
        for block_hash in removed:
            del blocks[block_hash]
        return [], removed
    removed = list(blocks)
    blocks.clear()
    return [], removed


class KVEventBuffer:
    """One engine's KV events: the open batch, a ring of closed ones and a mirror of the
    cached blocks (hash -> parent) that snapshots are read from without touching the pool."""

    def __init__(self, max_batches: int = DEFAULT_MAX_BATCHES, engine_id: str | None = None):
        if max_batches < 1:
            raise ValueError(f"max_batches must be at least 1, got {max_batches}")
        self.engine_id = engine_id or uuid.uuid4().hex
        self._pending: list[KVEvent] = []  # engine thread only
        self._lock = threading.Lock()
        self._batches: deque[KVEventBatch] = deque(maxlen=max_batches)
        self._blocks: dict[int, int | None] = {}  # as of batch self._seq
        self._seq = 0

    # ---- engine thread ----------------------------------------------------------------------
    def record(self, event: KVEvent) -> None:
        self._pending.append(event)

    def end_step(self) -> None:
        """Close the open batch, if it holds anything, as the next seq."""
        if not self._pending:
            return
        events, self._pending = tuple(self._pending), []
        with self._lock:
            for event in events:
                apply_event(self._blocks, event)
            self._seq += 1
            self._batches.append(KVEventBatch(self._seq, events))

    # ---- any thread -------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        return self._seq

    def since(self, engine_id: str | None, seq: int) -> dict:
        """Every batch after `seq` of engine `engine_id`, or a snapshot when that cannot be
        told from the ring. Reply: {"engine_id", "seq": the last seq it covers, and either
        "batches": [KVEventBatch.to_wire(), ...] or "snapshot": [[hash, parent], ...]}."""
        with self._lock:
            reply = self._batches_after(seq) if engine_id == self.engine_id else None
            if reply is None:
                reply = {"engine_id": self.engine_id, "seq": self._seq,
                         "snapshot": [[h, parent] for h, parent in self._blocks.items()]}
            return reply

    def unseen(self, cursors: Mapping[str, int]) -> dict | None:
        """The batches a consumer has not seen, given its cursors (engine id -> last seq it
        applied): a `since` reply (no batches: it is up to date), or None when it holds no
        cursor for this engine or is too far behind for the ring (its own `since` gets a
        snapshot). What a replica sends back along with a response, unasked."""
        seq = cursors.get(self.engine_id)
        if seq is None:
            return None
        with self._lock:
            return self._batches_after(seq)

    def _batches_after(self, seq: int) -> dict | None:
        """The reply of batches after `seq` of this engine; None if the ring does not hold
        them all. Under the lock."""
        oldest = self._batches[0].seq if self._batches else self._seq + 1
        if not oldest - 1 <= seq <= self._seq:
            return None
        newer = islice(self._batches, seq - oldest + 1, None)
        return {"engine_id": self.engine_id, "seq": self._seq,
                "batches": [batch.to_wire() for batch in newer]}
