"""Each request's append-only block table over one BlockPool, with prefix caching.

The scheduler asks three things: which full blocks of a new request are already cached
(`get_computed_blocks`), give a request enough blocks for its next tokens
(`allocate_slots`), and release a request's blocks (`free`). No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleetlm.executor.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from fleetlm.executor.kv_events import KVEventBuffer
from fleetlm.executor.request import Request


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables of the running requests, on top of a `BlockPool`.

    A block becomes cached as soon as every token in it is computed or scheduled in the
    current step: a request scheduled later in the same step may hit it, which is correct
    because each layer writes every token's KV before its attention reads any.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True, hash_seed: int = 0,
        kv_events: KVEventBuffer | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hash_seed = hash_seed
        self.block_pool = BlockPool(num_blocks, enable_caching, kv_events)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks already offered to the cache
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def update_block_hashes(self, request: Request) -> None:
        """Extend `request.block_hashes` to every full block of `request.all_token_ids`."""
        hashes = request.block_hashes
        for index in range(len(hashes), request.num_tokens // self.block_size):
            parent = hashes[-1] if hashes else None
            tokens = self._block_tokens(request, index)
            hashes.append(hash_block_tokens(parent, tokens, (), self.hash_seed))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached full blocks that prefixes the request, and its tokens.

        Leaves at least the last token to compute (its logits are needed), and finds nothing
        for requests asking for prompt logprobs (every prompt position must be computed).
        Side-effect free: the blocks are only claimed by `allocate_slots`.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self.update_block_hashes(request)
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for index, block_hash in enumerate(request.block_hashes[:max_num_blocks]):
            block = self.block_pool.get_cached_block(block_hash, self._block_tokens(request, index))
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def num_cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens of a prompt's leading full blocks that are cached now (as
        `get_computed_blocks` would find them, without a request and without counting a
        query). Only reads, so other threads may ask; the answer may be stale by the time the
        prompt is admitted (a block evicted meanwhile), which suits a routing decision."""
        if not self.enable_caching:
            return 0
        parent = None
        num_blocks = (len(token_ids) - 1) // self.block_size
        for index in range(num_blocks):
            tokens = token_ids[index * self.block_size:(index + 1) * self.block_size]
            parent = hash_block_tokens(parent, tokens, (), self.hash_seed)
            if self.block_pool.get_cached_block(parent, tokens) is None:
                return index * self.block_size
        return num_blocks * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        delay_cache_blocks: bool = False,
    ) -> list[int] | None:
        """Grow the request's block table to hold its computed tokens, the prefix-hit blocks
        `new_computed_blocks` (only on its first allocation) and `num_new_tokens` more.

        Returns the ids of the newly allocated blocks (not the hit blocks), or None, changing
        nothing, if too few blocks are free. Free cached blocks may be evicted for it. Newly
        full blocks are cached at once unless `delay_cache_blocks` (KV still being loaded
        from elsewhere; call `cache_blocks` when it has arrived).
        """
        blocks = self.req_to_blocks.get(request.request_id, [])
        assert not (blocks and new_computed_blocks), "prefix hits only on the first allocation"
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = _cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(0, num_required - len(blocks) - len(new_computed_blocks))
        num_hits_on_free = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_hits_on_free:
            return None
        if request.request_id not in self.req_to_blocks:
            self._start_request(request, new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        self.req_to_blocks[request.request_id].extend(new_blocks)
        if not delay_cache_blocks:
            self.cache_blocks(request, num_computed + num_new_tokens)
        return [block.block_id for block in new_blocks]

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Offer the request's blocks that are full within its first `num_tokens` tokens."""
        if not self.enable_caching:
            return
        request_id = request.request_id
        num_known_tokens = min(num_tokens, request.num_tokens)
        start, end = self.num_cached_blocks[request_id], num_known_tokens // self.block_size
        if end <= start:
            return
        self.update_block_hashes(request)
        self.block_pool.cache_full_blocks(
            self.req_to_blocks[request_id][start:end],
            request.block_hashes[start:end],
            [self._block_tokens(request, index) for index in range(start, end)],
            request.block_hashes[start - 1] if start else None,
        )
        self.num_cached_blocks[request_id] = end

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its tail is evicted before its head."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def check_invariants(self) -> None:
        """The pool's invariants, and every block's ref count equals its number of holders."""
        self.block_pool.check_invariants()
        num_holders = [0] * self.num_blocks
        for blocks in self.req_to_blocks.values():
            assert len({b.block_id for b in blocks}) == len(blocks), "a block repeats in a table"
            for block in blocks:
                num_holders[block.block_id] += 1
        for block, count in zip(self.block_pool.blocks, num_holders, strict=True):
            assert block.ref_cnt == count, f"{block} is held by {count} requests"

    def _start_request(self, request: Request, computed_blocks: Sequence[KVCacheBlock]) -> None:
        """First allocation since admission: claim the hits and count the lookup."""
        self.block_pool.touch(computed_blocks)
        self.req_to_blocks[request.request_id] = list(computed_blocks)
        self.num_cached_blocks[request.request_id] = len(computed_blocks)
        # Counted here, not in get_computed_blocks, so a request retried across steps (no
        # free blocks, remote KV not ready) is counted once per admission.
        if self.enable_caching and request.sampling_params.prompt_logprobs is None:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * self.block_size

    def _block_tokens(self, request: Request, index: int) -> list[int]:
        start = index * self.block_size
        return request.all_token_ids[start:start + self.block_size]
