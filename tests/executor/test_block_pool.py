"""BlockPool, its LRU free queue and the chained block hash: exact block ids and orders."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleetlm.executor.block_pool import (
    BlockPool,
    FreeKVCacheBlockQueue,
    KVCacheBlock,
    hash_block_tokens,
)


def ids(blocks):
    return [block.block_id for block in blocks]


def free_order(pool: BlockPool) -> list[int]:
    return ids(pool.free_block_queue.get_all_free_blocks())


def cache(pool: BlockPool, blocks, first_token: int, block_size: int = 4) -> list[int]:
    """Cache `blocks` as a chain of blocks holding consecutive tokens; return their hashes."""
    hashes, parent = [], None
    tokens = []
    for index in range(len(blocks)):
        start = first_token + index * block_size
        tokens.append(list(range(start, start + block_size)))
        parent = hash_block_tokens(parent, tokens[-1])
        hashes.append(parent)
    pool.cache_full_blocks(blocks, hashes, tokens)
    return hashes


def test_hash_is_chained_seeded_and_keyed():
    base = hash_block_tokens(None, [1, 2, 3, 4])
    assert base == hash_block_tokens(None, (1, 2, 3, 4))
    assert 0 <= base < 2**64
    assert hash_block_tokens(None, [1, 2, 3, 5]) != base
    assert hash_block_tokens(7, [1, 2, 3, 4]) != base
    assert hash_block_tokens(None, [1, 2, 3, 4], extra_keys=["salt"]) != base
    assert hash_block_tokens(None, [1, 2, 3, 4], extra_keys=[3]) != base
    seeded = hash_block_tokens(None, [1, 2, 3, 4], seed=1)
    assert seeded != base
    assert seeded == hash_block_tokens(None, [1, 2, 3, 4], seed=1)


def test_hash_agrees_across_processes():
    code = (
        "from fleetlm.executor.block_pool import hash_block_tokens as h;"
        "print(h(h(None, [5, 6], ['s'], 3), [7, 8], ['s'], 3))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = hash_block_tokens(hash_block_tokens(None, [5, 6], ["s"], 3), [7, 8], ["s"], 3)
    assert result.stdout.strip() == str(here)


def test_free_queue_popleft_remove_append():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeKVCacheBlockQueue(blocks)
    assert queue.popleft() is blocks[0]
    queue.remove(blocks[2])
    queue.append(blocks[0])
    queue.append(blocks[2])
    assert ids(queue.get_all_free_blocks()) == [1, 3, 4, 0, 2]
    assert queue.num_free_blocks == 5
    for expected in [1, 3, 4, 0, 2]:
        assert queue.popleft().block_id == expected
    with pytest.raises(ValueError, match="no free blocks"):
        queue.popleft()


def test_allocation_and_ref_counts():
    pool = BlockPool(num_blocks=6)
    a = pool.get_new_blocks(3)
    assert ids(a) == [0, 1, 2]
    assert [b.ref_cnt for b in a] == [1, 1, 1]
    assert pool.num_free_blocks == 3
    assert pool.usage == pytest.approx(0.5)
    pool.touch(a[:2])  # a second request shares the first two blocks
    assert [b.ref_cnt for b in a] == [2, 2, 1]
    pool.free_blocks(reversed(a))
    assert [b.ref_cnt for b in a] == [1, 1, 0]
    assert free_order(pool) == [3, 4, 5, 2]
    pool.check_invariants()
    with pytest.raises(ValueError, match="asked for 5 blocks, only 4 free"):
        pool.get_new_blocks(5)


def test_eviction_order_unused_first_then_tail_before_head():
    pool = BlockPool(num_blocks=6, enable_caching=True)
    a, b = pool.get_new_blocks(3), pool.get_new_blocks(2)
    cache(pool, a, first_token=0)
    pool.free_blocks(reversed(a))  # the caller frees a request tail first
    pool.free_blocks(reversed(b))
    assert free_order(pool) == [5, 2, 1, 0, 4, 3]
    reused = pool.get_new_blocks(3)
    assert ids(reused) == [5, 2, 1]
    assert a[1].block_hash is None and a[2].block_hash is None  # evicted from the map
    assert a[0].block_hash is not None
    assert len(pool.cached_blocks) == 1
    pool.check_invariants()


def test_freed_cached_blocks_stay_matchable_until_reused():
    pool = BlockPool(num_blocks=3)
    blocks = pool.get_new_blocks(2)
    hashes = cache(pool, blocks, first_token=10)
    pool.free_blocks(reversed(blocks))
    assert pool.num_free_blocks == 3
    assert pool.get_cached_block(hashes[0], [10, 11, 12, 13]) is blocks[0]
    assert pool.get_cached_block(hashes[1], [14, 15, 16, 17]) is blocks[1]
    assert ids(pool.get_new_blocks(2)) == [2, 1]  # block 1 is reused: its hash is gone
    assert pool.get_cached_block(hashes[1], [14, 15, 16, 17]) is None
    assert pool.get_cached_block(hashes[0], [10, 11, 12, 13]) is blocks[0]
    pool.check_invariants()


def test_touch_takes_a_free_cached_block_out_of_the_queue():
    pool = BlockPool(num_blocks=4)
    blocks = pool.get_new_blocks(2)
    hashes = cache(pool, blocks, first_token=0)
    pool.free_blocks(reversed(blocks))
    assert free_order(pool) == [2, 3, 1, 0]
    hit = pool.get_cached_block(hashes[0], [0, 1, 2, 3])
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert free_order(pool) == [2, 3, 1]
    assert ids(pool.get_new_blocks(3)) == [2, 3, 1]
    assert pool.get_cached_block(hashes[0], [0, 1, 2, 3]) is hit  # in use: never evicted
    pool.check_invariants()


def test_hash_collision_with_other_tokens_is_a_miss():
    pool = BlockPool(num_blocks=2)
    block = pool.get_new_blocks(1)[0]
    pool.cache_full_blocks([block], [42], [[1, 2, 3, 4]])
    assert pool.get_cached_block(42, [1, 2, 3, 4]) is block
    assert pool.get_cached_block(42, [1, 2, 3, 5]) is None
    assert pool.get_cached_block(43, [1, 2, 3, 4]) is None


def test_duplicate_hash_keeps_its_first_owner():
    pool = BlockPool(num_blocks=2)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_blocks([first], [42], [[1, 2]])
    pool.cache_full_blocks([second], [42], [[1, 2]])
    assert pool.cached_blocks == {42: first}
    assert second.block_hash is None
    pool.free_blocks([second, first])
    pool.check_invariants()


def test_caching_disabled_never_matches():
    pool = BlockPool(num_blocks=2, enable_caching=False)
    block = pool.get_new_blocks(1)[0]
    pool.cache_full_blocks([block], [42], [[1, 2]])
    assert pool.get_cached_block(42, [1, 2]) is None
    assert block.block_hash is None


def test_check_invariants_names_what_broke():
    pool = BlockPool(num_blocks=3)
    blocks = pool.get_new_blocks(2)
    cache(pool, blocks[:1], first_token=0)
    pool.check_invariants()
    blocks[1].ref_cnt = 0  # in use by count, but not in the free queue
    with pytest.raises(AssertionError, match="free 1 \\+ in use 1 != total 3"):
        pool.check_invariants()
    blocks[1].ref_cnt = 1
    blocks[0].block_hash = 7  # the map says otherwise
    with pytest.raises(AssertionError, match="missing from map"):
        pool.check_invariants()


def test_num_blocks_must_be_positive():
    with pytest.raises(ValueError, match="num_blocks must be at least 1"):
        BlockPool(num_blocks=0)
