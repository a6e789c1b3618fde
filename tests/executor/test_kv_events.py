"""KV events: what the block pool reports, per-step batches, the ring and its snapshots."""

from __future__ import annotations

import random

import msgpack
import pytest
from sched_helpers import make_scheduler
from test_sched_random import (
    MAX_MODEL_LEN,
    MAX_NUM_BATCHED_TOKENS,
    MAX_NUM_SEQS,
    NUM_BLOCKS,
    RandomConnector,
    run_workload,
)

from fleetlm.executor.block_pool import BlockPool, hash_block_tokens, hash_prompt_blocks
from fleetlm.executor.kv_cache_manager import KVCacheManager
from fleetlm.executor.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventBuffer,
    apply_event,
)
from fleetlm.executor.request import Request
from fleetlm.executor.sampling_params import SamplingParams

BLOCK_SIZE = 4


def _events(buffer: KVEventBuffer, seq: int = 0) -> list:
    reply = buffer.since(buffer.engine_id, seq)
    return [event for wire in reply["batches"]
            for event in KVEventBatch.from_wire(wire).events]


def test_pool_reports_stored_runs_evictions_and_a_reset_in_order():
    buffer = KVEventBuffer()
    pool = BlockPool(4, kv_events=buffer)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks[:1], [11], [[1]], parent_hash=None)
    pool.cache_full_blocks(blocks, [11, 12, 13], [[1], [2], [3]], parent_hash=None)
    buffer.end_step()
    # 11 was cached already: the new run starts after it, with 11 as its parent.
    assert _events(buffer) == [BlockStored((11,), None, ((1,),)),
                               BlockStored((12, 13), 11, ((2,), (3,)))]
    pool.free_blocks(reversed(blocks))  # tail first: 13 is evicted first
    taken = pool.get_new_blocks(3)  # the never-cached block, then 13 and 12
    buffer.end_step()
    assert _events(buffer, 1) == [BlockRemoved((13, 12))]
    assert not pool.reset_prefix_cache()  # blocks in use: nothing changes
    pool.free_blocks(taken)
    assert pool.reset_prefix_cache() and not pool.cached_blocks
    buffer.end_step()
    assert _events(buffer, 2) == [AllBlocksCleared()]
    assert buffer.since(buffer.engine_id, 3) == {"engine_id": buffer.engine_id, "seq": 3,
                                                 "batches": []}


def test_a_skipped_duplicate_in_the_middle_splits_the_run():
    buffer = KVEventBuffer()
    pool = BlockPool(4, kv_events=buffer)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_blocks(blocks[:1], [22], [[2]], parent_hash=21)
    pool.cache_full_blocks(blocks[1:], [21, 22, 23], [[1], [2], [3]], parent_hash=7)
    buffer.end_step()
    assert _events(buffer) == [BlockStored((22,), 21, ((2,),)), BlockStored((21,), 7, ((1,),)),
                               BlockStored((23,), 22, ((3,),))]


def test_steps_without_changes_take_no_seq_and_the_ring_answers_or_snapshots():
    buffer = KVEventBuffer(max_batches=2)
    pool = BlockPool(8, kv_events=buffer)
    buffer.end_step()
    assert buffer.seq == 0
    for i in range(3):
        pool.cache_full_blocks(pool.get_new_blocks(1), [100 + i], [[i]], 99 + i if i else None)
        buffer.end_step()
    assert buffer.seq == 3
    assert [wire[0] for wire in buffer.since(buffer.engine_id, 1)["batches"]] == [2, 3]
    snapshot = {"engine_id": buffer.engine_id, "seq": 3,
                "snapshot": [[100, None], [101, 100], [102, 101]]}
    assert buffer.since(buffer.engine_id, 0) == snapshot  # batch 1 left the ring
    assert buffer.since("another engine", 3) == snapshot  # a restart
    assert buffer.since(buffer.engine_id, 4)["snapshot"]  # ahead of the engine: confused


def test_replies_survive_msgpack():
    buffer = KVEventBuffer()
    pool = BlockPool(2, kv_events=buffer)
    pool.cache_full_blocks(pool.get_new_blocks(2), [1 << 63, 5], [[1, 2], [3, 4]], None)
    buffer.end_step()
    reply = buffer.since(buffer.engine_id, 0)
    assert msgpack.unpackb(msgpack.packb(reply)) == reply
    assert KVEventBatch.from_wire(reply["batches"][0]).events == (
        BlockStored((1 << 63, 5), None, ((1, 2), (3, 4))),)


def test_manager_passes_the_parent_of_each_run():
    buffer = KVEventBuffer()
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, kv_events=buffer)
    request = Request("a", list(range(10)), SamplingParams())
    manager.allocate_slots(request, 6)  # caches the first block
    request.num_computed_tokens = 6
    manager.allocate_slots(request, 4)  # the second, its parent the first
    buffer.end_step()
    first, second = hash_prompt_blocks(list(range(10)), BLOCK_SIZE)
    assert _events(buffer) == [BlockStored((first,), None, ((0, 1, 2, 3),)),
                               BlockStored((second,), first, ((4, 5, 6, 7),))]


@pytest.mark.parametrize("seed", [0, 5])
def test_router_hashes_equal_the_engines(seed):
    tokens = [7, 3, 9, 1, 4, 4, 2, 8, 6, 0, 5]
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, hash_seed=seed)
    request = Request("a", tokens, SamplingParams())
    manager.update_block_hashes(request)
    assert hash_prompt_blocks(tokens, BLOCK_SIZE, seed) == request.block_hashes
    assert request.block_hashes[0] == hash_block_tokens(None, tokens[:4], (), seed)
    assert hash_prompt_blocks(tokens[:3], BLOCK_SIZE, seed) == []


def test_events_off_by_default_cost_no_buffer():
    assert BlockPool(2).kv_events is None
    assert KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE).block_pool.kv_events is None


@pytest.mark.parametrize("is_connected", [False, True])
def test_a_consumer_mirrors_the_cache_through_a_random_workload(is_connected):
    """The seeded random scheduler workload (preemptions, aborts, remote KV) with events on:
    a consumer polling at random, from a ring of 4 batches, always holds the cached hashes."""
    rng = random.Random(5)
    scheduler = make_scheduler(
        num_blocks=NUM_BLOCKS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN,
        connector=RandomConnector(random.Random(7)) if is_connected else None)
    buffer = scheduler.kv_cache_manager.block_pool.kv_events = KVEventBuffer(max_batches=4)
    pool, mirror, cursor = scheduler.kv_cache_manager.block_pool, {}, (None, 0)
    kinds, check_invariants = set(), scheduler.check_invariants

    def step_end_and_poll():  # run_step checks invariants at each step's middle and end
        nonlocal cursor
        check_invariants()
        buffer.end_step()
        if rng.random() < 0.7:  # often enough, 4 batches go by: a gap
            return
        reply = buffer.since(*cursor)
        if "snapshot" in reply:
            mirror.clear()
            mirror.update(dict(reply["snapshot"]))
        for wire in reply.get("batches", ()):
            for event in KVEventBatch.from_wire(wire).events:
                apply_event(mirror, event)
        kinds.update(k for k in ("snapshot", "batches") if reply.get(k))
        cursor = (reply["engine_id"], reply["seq"])
        assert mirror.keys() == pool.cached_blocks.keys()

    scheduler.check_invariants = step_end_and_poll
    run_workload(scheduler, rng)
    assert kinds == {"snapshot", "batches"} and scheduler.num_preemptions > 0
