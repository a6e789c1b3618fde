"""Fixed-size KV blocks, their reference counts, the LRU free queue and the prefix-cache map.

Region map of one block's life:

    free, uncached ──get_new_blocks──> in use ──(full)──cache_full_blocks──> in use, cached
         ^                                                                        │
         └── evicted by get_new_blocks <── free, cached (still matchable) <──free_blocks
                                                 │                   ^
                                                 └──touch (a hit)────┘ back in use

There is no reserved null block: every block id in [0, num_blocks) can hold KV.
No torch here: the scheduler side runs and is tested without it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import msgpack

from fleetlm.executor.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBuffer

_HASH_NUM_BYTES = 8  # block hashes are 64-bit ints: small, and enough to make collisions rare


def hash_block_tokens(
    parent_hash: int | None,
    token_ids: Sequence[int],
    extra_keys: Sequence[int | str] = (),
    seed: int = 0,
) -> int:
    """The chained hash of one full block: same inputs give the same int in every process.

    `parent_hash` is the hash of the previous block (None for the first block), so a block
    hash identifies the whole prefix up to and including the block. `extra_keys` (a cache
    salt, a LoRA id) make otherwise equal blocks distinct; `seed` comes from
    `CacheConfig.hash_seed` so separate pools with the same seed agree.
    """
    payload = msgpack.packb([seed, parent_hash, list(token_ids), list(extra_keys)])
    digest = hashlib.sha256(payload).digest()
    return int.from_bytes(digest[:_HASH_NUM_BYTES], "little")


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int, seed: int = 0) -> list[int]:
    """The chained hash of every full block of `token_ids`, as the engine computes them
    (`KVCacheManager.update_block_hashes`): what a router matches against KV events."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block_tokens(parent, token_ids[start:start + block_size], (), seed))
    return hashes


class KVCacheBlock:
    """One block of KV slots. `block_hash` and `token_ids` are set only while it is cached."""

    __slots__ = ("block_hash", "block_id", "next_free", "prev_free", "ref_cnt", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def reset_hash(self) -> None:
        self.block_hash = None
        self.token_ids = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeKVCacheBlockQueue:
    """Doubly linked LRU queue of free blocks: evict from the front, free to the back.

    Every operation is O(1), including `remove` from the middle (a freed cached block that
    gets a prefix hit again). Sentinel head and tail blocks (id -1) keep the links simple.
    """

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self.num_free_blocks = 0
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks left to pop")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, f"{block} not free"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        assert block.prev_free is None and block.next_free is None, f"{block} already free"
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """The free blocks in eviction order (for tests and invariant checks)."""
        blocks = []
        block = self._head.next_free
        while block is not self._tail:
            blocks.append(block)
            block = block.next_free
        return blocks


class BlockPool:
    """All KV blocks of one cache: allocation, reference counts and the prefix-cache map.

    A block is in use while `ref_cnt > 0` and in the free queue when `ref_cnt == 0`. A freed
    block keeps its hash, so prefix lookups still find it until `get_new_blocks` evicts it.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 kv_events: KVEventBuffer | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        self.cached_blocks: dict[int, KVCacheBlock] = {}  # block hash -> block
        self.kv_events = kv_events  # told of every hash cached and evicted; None: nobody asks

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` from the front of the free queue, evicting their cached hashes."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free")
        blocks = [self.free_block_queue.popleft() for _ in range(num_blocks)]
        evicted = [block.block_hash for block in blocks if block.block_hash is not None]
        for block in blocks:
            self._evict(block)
            block.ref_cnt = 1
        if evicted and self.kv_events is not None:
            self.kv_events.record(BlockRemoved(tuple(evicted)))
        return blocks

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue in the
        given order, so the first ones given are evicted first."""
        for block in ordered_blocks:
            assert block.ref_cnt > 0, f"freeing {block} that is not in use"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one more reference to each block (a prefix hit), un-freeing free ones."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[int],
        block_token_ids: Sequence[Sequence[int]],
        parent_hash: int | None = None,
    ) -> None:
        """Register full blocks under their hashes so later requests can hit them.

        `blocks` are consecutive blocks of one request, `parent_hash` the hash of the block
        before the first (None: they start the request); it only goes into KV events.
        A hash already owned by another block (two requests computed the same block) keeps
        its first owner; the duplicate stays uncached and is reused like any other block.
        """
        if not self.enable_caching:
            return
        run_parent, run = parent_hash, []  # newly cached blocks in a row: one stored event
        for block, block_hash, token_ids in zip(blocks, block_hashes, block_token_ids, strict=True):
            if block.block_hash is not None or block_hash in self.cached_blocks:
                self._record_stored(run_parent, run)
                run_parent, run = block_hash, []
                continue
            block.block_hash = block_hash
            block.token_ids = tuple(token_ids)
            self.cached_blocks[block_hash] = block
            run.append(block)
        self._record_stored(run_parent, run)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash, if no block is in use (a running request's blocks are
        left alone, as vLLM does); False, changing nothing, if some are."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.cached_blocks.values():
            block.reset_hash()
        self.cached_blocks.clear()
        if self.kv_events is not None:
            self.kv_events.record(AllBlocksCleared())
        return True

    def get_cached_block(self, block_hash: int, token_ids: Sequence[int]) -> KVCacheBlock | None:
        """The cached block with this hash and these exact tokens; a collision is a miss."""
        block = self.cached_blocks.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def _record_stored(self, parent_hash: int | None, blocks: list[KVCacheBlock]) -> None:
        if blocks and self.kv_events is not None:
            self.kv_events.record(BlockStored(tuple(b.block_hash for b in blocks), parent_hash,
                                              tuple(b.token_ids for b in blocks)))

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.reset_hash()

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant."""
        free = self.free_block_queue.get_all_free_blocks()
        free_ids = {block.block_id for block in free}
        assert len(free_ids) == len(free), "a block appears twice in the free queue"
        assert len(free) == self.num_free_blocks, (
            f"free queue holds {len(free)} blocks but counts {self.num_free_blocks}"
        )
        num_in_use = sum(1 for block in self.blocks if block.ref_cnt > 0)
        assert len(free) + num_in_use == self.num_blocks, (
            f"free {len(free)} + in use {num_in_use} != total {self.num_blocks}"
        )
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"{block} has a negative ref count"
            assert (block.ref_cnt == 0) == (block.block_id in free_ids), (
                f"{block} is {'free' if block.block_id in free_ids else 'not free'}"
            )
            self._check_cached(block)
        assert all(b.block_hash == h for h, b in self.cached_blocks.items()), "hash map mismatch"

    def _check_cached(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            assert block.token_ids is None, f"{block} has tokens but no hash"
            return
        assert block.token_ids is not None, f"{block} is cached without its tokens"
        assert self.cached_blocks.get(block.block_hash) is block, f"{block} missing from map"
