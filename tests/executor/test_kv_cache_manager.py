"""KVCacheManager: block tables, block hashes, prefix hits and their accounting."""

from __future__ import annotations

import pytest

from fleetlm.executor import kv_cache_manager as kv_module
from fleetlm.executor.block_pool import hash_block_tokens
from fleetlm.executor.kv_cache_manager import KVCacheManager
from fleetlm.executor.request import Request
from fleetlm.executor.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, token_ids: list[int], **params) -> Request:
    return Request(request_id, token_ids, SamplingParams(**params))


def admit(manager: KVCacheManager, request: Request) -> list[int]:
    """What the scheduler does for a new request whose whole prompt fits the budget."""
    blocks, num_computed = manager.get_computed_blocks(request)
    new_ids = manager.allocate_slots(request, request.num_tokens - num_computed, blocks)
    assert new_ids is not None
    request.num_computed_tokens = request.num_tokens
    return new_ids


def test_block_hashes_cover_full_blocks_and_grow_with_outputs():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, hash_seed=5)
    request = make_request("a", list(range(10)))
    manager.update_block_hashes(request)
    first = hash_block_tokens(None, [0, 1, 2, 3], (), 5)
    second = hash_block_tokens(first, [4, 5, 6, 7], (), 5)
    assert request.block_hashes == [first, second]
    request.append_output_token_ids([10])
    manager.update_block_hashes(request)
    assert len(request.block_hashes) == 2
    request.append_output_token_ids([11])
    manager.update_block_hashes(request)
    assert request.block_hashes[2] == hash_block_tokens(second, [8, 9, 10, 11], (), 5)


def test_allocate_slots_returns_new_block_ids_and_grows_append_only():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(6)))
    assert manager.allocate_slots(request, 6) == [0, 1]
    request.num_computed_tokens = 6
    request.append_output_token_ids([6, 7])
    assert manager.allocate_slots(request, 2) == []  # tokens 6, 7 fit block 1
    request.num_computed_tokens = 8
    request.append_output_token_ids([8])
    assert manager.allocate_slots(request, 1) == [2]
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert manager.num_free_blocks == 2
    manager.check_invariants()


def test_allocate_slots_fails_without_changing_anything():
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    big = make_request("big", list(range(13)))
    assert manager.allocate_slots(big, 13) is None
    assert manager.get_block_ids("big") == []
    assert manager.num_free_blocks == 3
    assert manager.prefix_cache_queries == 0
    manager.check_invariants()


def test_prefix_hit_of_full_blocks_shares_them():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(10)))
    assert admit(manager, a) == [0, 1, 2]
    b = make_request("b", list(range(8)) + [100, 101, 102])
    blocks, num_computed = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [0, 1]
    assert num_computed == 8
    assert manager.allocate_slots(b, 3, blocks) == [3]
    assert manager.get_block_ids("b") == [0, 1, 3]
    assert [blk.ref_cnt for blk in manager.block_pool.blocks[:4]] == [2, 2, 1, 1]
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (10 + 11, 8)
    manager.check_invariants()


@pytest.mark.parametrize(
    ("prompt_len", "expected_hit"),
    [(9, 8), (8, 4), (4, 0), (12, 8)],
)
def test_hit_leaves_the_last_token_to_compute(prompt_len, expected_hit):
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(12))))
    _, num_computed = manager.get_computed_blocks(make_request("b", list(range(prompt_len))))
    assert num_computed == expected_hit


def test_no_hits_when_prompt_logprobs_are_asked_for():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(12))))
    b = make_request("b", list(range(12)), prompt_logprobs=0)
    assert manager.get_computed_blocks(b) == ([], 0)
    admit(manager, b)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (12, 0)


def test_lookup_is_counted_once_per_admission():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(12))))
    b = make_request("b", list(range(12)))
    for _ in range(3):  # a scheduler retrying a request it could not place
        manager.get_computed_blocks(b)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (12, 0)
    admit(manager, b)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (24, 8)


def test_freed_blocks_are_hit_again_and_evicted_tail_first():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(12)))
    admit(manager, a)
    manager.free(a)
    assert [b.block_id for b in manager.block_pool.free_block_queue.get_all_free_blocks()] == [
        3, 2, 1, 0,
    ]
    # A new request with another prompt takes the unused block, then a's tail.
    other = make_request("other", [50, 51, 52, 53, 54])
    assert admit(manager, other) == [3, 2]
    # a's head blocks are still cached and hit.
    again = make_request("again", list(range(9)))
    blocks, num_computed = manager.get_computed_blocks(again)
    assert ([b.block_id for b in blocks], num_computed) == ([0, 1], 8)
    manager.check_invariants()


def test_hits_on_free_blocks_count_against_the_free_blocks():
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))
    admit(manager, a)
    manager.free(a)  # blocks 0, 1 cached and free; block 2 free
    b = make_request("b", list(range(8)) + [70, 71, 72, 73, 74])
    blocks, _ = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [0, 1]
    # 13 tokens need 4 blocks: 2 hits + 2 new, but only block 2 is free besides the hits.
    assert manager.allocate_slots(b, 5, blocks) is None
    assert manager.num_free_blocks == 3
    assert manager.allocate_slots(b, 4, blocks) == [2]
    manager.check_invariants()


def test_forced_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(kv_module, "hash_block_tokens", lambda *args: 1234)
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", [1, 2, 3, 4, 5]))
    b = make_request("b", [9, 9, 9, 9, 9])
    assert b.block_hashes == [] and manager.get_computed_blocks(b) == ([], 0)
    assert b.block_hashes == [1234]
    same = make_request("same", [1, 2, 3, 4, 6])
    blocks, num_computed = manager.get_computed_blocks(same)
    assert ([blk.block_id for blk in blocks], num_computed) == ([0], 4)


def test_caching_disabled_still_hashes_but_never_hits():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE, enable_caching=False)
    admit(manager, make_request("a", list(range(9))))
    b = make_request("b", list(range(9)))
    assert manager.get_computed_blocks(b) == ([], 0)
    admit(manager, b)
    assert manager.block_pool.cached_blocks == {}
    assert manager.prefix_cache_queries == 0
    manager.update_block_hashes(b)
    assert len(b.block_hashes) == 2


def test_delayed_caching_registers_blocks_later():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))
    manager.allocate_slots(a, 8, delay_cache_blocks=True)
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    manager.cache_blocks(a, 8)
    _, num_computed = manager.get_computed_blocks(make_request("c", list(range(9))))
    assert num_computed == 8


def test_check_invariants_counts_holders():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(5))))
    manager.check_invariants()
    manager.block_pool.blocks[0].ref_cnt = 2
    with pytest.raises(AssertionError, match="held by 1 requests"):
        manager.check_invariants()


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        KVCacheManager(num_blocks=4, block_size=0)


@pytest.mark.parametrize(("prompt", "expected"), [
    (list(range(10)), 8),  # both full blocks of the cached request
    (list(range(8)), 4),  # the last token is left to compute: one block
    ([*range(4), 99, 5, 6, 7, 8], 4),  # diverges in the second block
    ([9, *range(1, 10)], 0),
])
def test_num_cached_prefix_tokens_answers_as_an_admission_would(prompt, expected):
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, hash_seed=3)
    cached = make_request("a", list(range(10)))
    admit(manager, cached)
    manager.cache_blocks(cached, cached.num_computed_tokens)
    queries = manager.prefix_cache_queries
    assert manager.num_cached_prefix_tokens(prompt) == expected
    assert manager.get_computed_blocks(make_request("b", prompt))[1] == expected
    assert manager.prefix_cache_queries == queries  # neither counts as a lookup
