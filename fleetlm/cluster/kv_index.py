"""The router's prefix index: which replicas hold each KV block, mirrored from KV events.

    replica's engine ──kv_events_since(cursor)──> reply ──apply(replica, reply)──> index
                     ──a stream's first chunk, given the cursors: unseen(cursors)──┘ │
    prompt block hashes ──match──> leading blocks cached per replica <────────────────┘

Each replica's view is rebuilt exactly from its replies (`fleetlm.executor.kv_events`):
batches are applied in seq order; a snapshot (the engine could not answer from its ring, or
it is another engine: the replica restarted) replaces the replica's blocks wholesale. Replies
come from the ingress's asks and, unasked, with the first chunk of each stream (the request
carried the index's cursors); one that comes late is skipped where the index has it already,
and one that leaves a gap drops the cursor, so the next ask gets a snapshot.
`remove_replica` purges a dead replica. No torch, no Ray: the ingress owns the asking; not
thread-safe (the routing table's lock guards it, serve_router.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fleetlm.executor.block_pool import hash_prompt_blocks
from fleetlm.executor.kv_events import KVEventBatch, apply_event

__all__ = ["KVIndex", "hash_prompt_blocks"]


class KVIndex:
    def __init__(self) -> None:
        self._replicas_of: dict[int, set[str]] = {}  # block hash -> replicas holding it
        self._blocks_of: dict[str, dict[int, int | None]] = {}  # replica -> hash -> parent
        self._cursors: dict[str, tuple[str, int]] = {}  # replica -> (engine id, last seq)
        self.num_snapshots = 0
        self.num_batches = 0

    @property
    def replicas(self) -> list[str]:
        return list(self._blocks_of)

    def cursor(self, replica: str) -> tuple[str | None, int]:
        """What to pass to the replica's `kv_events_since`: its engine id and last seq seen
        (None, 0 for a replica never heard from: the reply is a snapshot)."""
        return self._cursors.get(replica, (None, 0))

    def apply(self, replica: str, reply: dict) -> None:
        """Apply one `kv_events_since` reply of `replica`. Replies may come late (a
        stream's first chunk and an ask cross): what the index has applied already is
        skipped, and a reply that holds nothing newer changes nothing."""
        engine_id, seq = self.cursor(replica)
        if reply["engine_id"] == engine_id and reply["seq"] <= seq:
            return
        if "snapshot" in reply:
            self._replace(replica, {h: parent for h, parent in reply["snapshot"]})
            self.num_snapshots += 1
        elif not self._apply_batches(replica, reply):
            return
        self._cursors[replica] = (reply["engine_id"], reply["seq"])

    def cursors(self) -> tuple[tuple[str, int], ...]:
        """Every replica's cursor as (engine id, last seq): what a request carries for its
        replica to answer with the batches the index lacks (`RoutingRequest.kv_cursors`)."""
        return tuple(self._cursors.values())

    def remove_replica(self, replica: str) -> None:
        """Forget a replica (dead, replaced, scaled down): its blocks match nothing now."""
        self._replace(replica, {})
        del self._blocks_of[replica]
        self._cursors.pop(replica, None)

    def blocks_of(self, replica: str) -> dict[int, int | None]:
        """The replica's cached blocks as the index knows them: hash -> parent hash."""
        return dict(self._blocks_of.get(replica, {}))

    def num_blocks(self, replica: str) -> int:
        """How many blocks the replica caches, as the index knows them."""
        return len(self._blocks_of.get(replica, ()))

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Per replica holding the first block: how many leading blocks of the prompt it holds
        (replicas holding none are left out)."""
        matched: dict[str, int] = {}
        alive = set(self._replicas_of.get(block_hashes[0], ())) if block_hashes else set()
        for num_blocks, block_hash in enumerate(block_hashes, start=1):
            alive &= self._replicas_of.get(block_hash, set())
            if not alive:
                break
            for replica in alive:
                matched[replica] = num_blocks
        return matched

    def _apply_batches(self, replica: str, reply: dict) -> bool:
        """Apply the batches after the cursor if they follow on from it; drop the cursor
        if they do not (the next ask gets a snapshot)."""
        engine_id, seq = self.cursor(replica)
        batches = [KVEventBatch.from_wire(wire) for wire in reply["batches"] if wire[0] > seq]
        expected = [seq + 1 + i for i in range(len(batches))]
        if reply["engine_id"] != engine_id or [b.seq for b in batches] != expected or (
                seq + len(batches) != reply["seq"]):
            self._cursors.pop(replica, None)
            return False
        blocks = self._blocks_of.setdefault(replica, {})
        for batch in batches:
            for event in batch.events:
                added, removed = apply_event(blocks, event)
                self._unlink(replica, removed)
                self._link(replica, added)
        self.num_batches += len(batches)
        return True

    def _replace(self, replica: str, blocks: dict[int, int | None]) -> None:
        old = self._blocks_of.get(replica, {})
        self._unlink(replica, old.keys() - blocks.keys())
        self._link(replica, blocks.keys() - old.keys())
        self._blocks_of[replica] = blocks

    def _link(self, replica: str, block_hashes: Iterable[int]) -> None:
        for block_hash in block_hashes:
            self._replicas_of.setdefault(block_hash, set()).add(replica)

    def _unlink(self, replica: str, block_hashes: Iterable[int]) -> None:
        for block_hash in block_hashes:
            holders = self._replicas_of[block_hash]
            holders.discard(replica)
            if not holders:
                del self._replicas_of[block_hash]
