"""The router's prefix index mirrors a real engine's prefix cache from its KV events: the
built-in model with a KV cache small enough that blocks get evicted, a ring small enough
that a slow consumer misses batches, an engine restart, and batches that come unasked with
a replica's stream."""

from __future__ import annotations

import asyncio
import random

import pytest

from fleetlm.cluster.kv_index import KVIndex, hash_prompt_blocks
from fleetlm.cluster.migration import StreamChunk
from fleetlm.cluster.openai_protocol import CompletionRequest
from fleetlm.cluster.router import RoutingRequest
from fleetlm.cluster.server import LLMServer
from fleetlm.executor.async_engine import AsyncEngine
from fleetlm.executor.block_pool import hash_block_tokens
from fleetlm.executor.engine import LLMEngine
from fleetlm.executor.kv_events import BlockRemoved, BlockStored, KVEventBatch, KVEventBuffer
from fleetlm.executor.llm import make_engine_config
from fleetlm.executor.sampling_params import SamplingParams

BLOCK_SIZE = 16
NUM_BLOCKS = 16  # 256 tokens: four 60-token prompts do not fit at once
REPLICA = "r0"


@pytest.fixture(scope="module")
def config():
    return make_engine_config(dtype="float32", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                              enable_kv_events=True)


@pytest.fixture(scope="module")
def first_engine(config):
    engine = LLMEngine(config)
    yield engine
    engine.shutdown()


def _fresh_engine(config, first_engine: LLMEngine, max_batches: int) -> LLMEngine:
    """Another engine core over the loaded model (a restarted replica: new engine id, empty
    cache), its events kept in a ring of `max_batches`."""
    engine = LLMEngine(config, executor=first_engine.executor)
    buffer = KVEventBuffer(max_batches)
    engine.core.kv_events = buffer
    engine.core.scheduler.kv_cache_manager.block_pool.kv_events = buffer
    return engine


def _prompts(num_tenants: int, num_users: int, seed: int) -> list[list[int]]:
    """Tenants' 40-token system prompts, each followed by a user's 20 tokens."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 20000) for _ in range(40)] for _ in range(num_tenants)]
    return [prefix + [rng.randrange(100, 20000) for _ in range(20)]
            for _ in range(num_users) for prefix in prefixes]


def _serve(engine: LLMEngine, prompts: list[list[int]], on_step=None, prefix: str = "",
           num_at_once: int = 2) -> None:
    """`num_at_once` prompts at a time (one step each: one output token), calling
    `on_step()` after every step."""
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        while pending and len(engine.output_processor.requests) < num_at_once:
            i, prompt = pending.pop(0)
            engine.add_request(f"{prefix}{i}", prompt, SamplingParams(max_tokens=1))
        engine.step()
        if on_step is not None:
            on_step()


def _poll(index: KVIndex, engine: LLMEngine, replica: str = REPLICA) -> dict:
    reply = engine.kv_events_since(*index.cursor(replica))
    index.apply(replica, reply)
    return reply


def _assert_mirrors(index: KVIndex, engine: LLMEngine, replica: str = REPLICA) -> None:
    """The index holds exactly the engine's cached hashes, each with its true parent."""
    pool = engine.core.scheduler.kv_cache_manager.block_pool
    blocks = index.blocks_of(replica)
    assert blocks.keys() == pool.cached_blocks.keys()
    for block_hash, parent in blocks.items():
        tokens = pool.cached_blocks[block_hash].token_ids
        assert hash_block_tokens(parent, tokens, (), 0) == block_hash


def test_index_follows_every_step_including_evictions(config, first_engine):
    engine = _fresh_engine(config, first_engine, max_batches=1024)
    index = KVIndex()
    removed = []

    def poll_and_check():
        reply = _poll(index, engine)
        removed.extend(e for wire in reply.get("batches", ())
                       for e in KVEventBatch.from_wire(wire).events if isinstance(e, BlockRemoved))
        _assert_mirrors(index, engine)

    prompts = _prompts(num_tenants=4, num_users=2, seed=1)
    _serve(engine, prompts, poll_and_check)
    assert removed and index.num_snapshots == 1  # only the first ask, of a new replica
    last = hash_prompt_blocks(prompts[-1], BLOCK_SIZE)
    assert index.match(last) == {REPLICA: len(last)}  # its blocks are the newest: all cached
    assert engine.num_cached_prefix_tokens(prompts[-1]) == len(last) * BLOCK_SIZE
    assert engine.reset_prefix_cache()
    _poll(index, engine)
    assert index.blocks_of(REPLICA) == {} and index.match(last) == {}


def test_a_gap_is_replayed_from_a_snapshot_and_a_restart_replaces_the_replica(
        config, first_engine):
    engine = _fresh_engine(config, first_engine, max_batches=2)
    index = KVIndex()
    _poll(index, engine)  # the cursor of an empty cache
    prompts = _prompts(num_tenants=4, num_users=1, seed=2)
    _serve(engine, prompts[:3], num_at_once=1)
    assert engine.core.kv_events.seq > 2  # more batches than the ring holds
    assert "snapshot" in _poll(index, engine)
    _assert_mirrors(index, engine)
    _serve(engine, prompts[3:4])  # fewer batches than the ring holds: no snapshot needed
    assert "batches" in _poll(index, engine)
    _assert_mirrors(index, engine)
    old = set(index.blocks_of(REPLICA))

    restarted = _fresh_engine(config, first_engine, max_batches=2)
    _serve(restarted, prompts[:1], prefix="again-")
    assert "snapshot" in _poll(index, restarted)
    _assert_mirrors(index, restarted)
    assert old - set(index.blocks_of(REPLICA))  # the old engine's blocks are gone


def test_replies_out_of_order_drop_the_cursor_and_heal(config, first_engine):
    engine = _fresh_engine(config, first_engine, max_batches=1024)
    index = KVIndex()
    _poll(index, engine)
    cursor = index.cursor(REPLICA)
    _serve(engine, _prompts(num_tenants=1, num_users=1, seed=3))
    late = engine.kv_events_since(cursor[0], cursor[1] + 1)  # skips batch cursor + 1
    index.apply(REPLICA, late)
    assert index.cursor(REPLICA) == (None, 0)
    assert "snapshot" in _poll(index, engine)
    _assert_mirrors(index, engine)


def test_polling_the_async_engine_while_its_loop_runs(config, first_engine):
    """kv_events_since from the event loop while the engine thread steps (the ingress's
    view): each reply is consistent, and the last one equals the cache."""
    engine = AsyncEngine(config, engine=_fresh_engine(config, first_engine, max_batches=1024))
    index = KVIndex()

    async def one(i: int, prompt: list[int]) -> None:
        async for _ in engine.generate(prompt, SamplingParams(max_tokens=2), f"async-{i}"):
            index.apply(REPLICA, engine.kv_events_since(*index.cursor(REPLICA)))

    async def scenario() -> None:
        index.apply(REPLICA, engine.kv_events_since())  # empty: later changes come as batches
        await asyncio.gather(*(one(i, p) for i, p in enumerate(_prompts(2, 2, seed=4))))
        index.apply(REPLICA, engine.kv_events_since(*index.cursor(REPLICA)))
        await engine.shutdown()

    asyncio.run(scenario())
    assert index.num_batches > 0
    _assert_mirrors(index, engine.engine)


def test_unseen_answers_from_the_ring_only_for_its_own_engine():
    buffer = KVEventBuffer(max_batches=2)
    for block_hash in (1, 2, 3):
        buffer.record(BlockStored((block_hash,), block_hash - 1 or None, ((block_hash,),)))
        buffer.end_step()
    engine_id = buffer.engine_id
    assert buffer.unseen({"another engine": 0}) is None
    assert buffer.unseen({engine_id: 0}) is None  # batch 1 left the ring: ask for a snapshot
    reply = buffer.unseen({"another engine": 0, engine_id: 1})
    assert [wire[0] for wire in reply["batches"]] == [2, 3] and reply["seq"] == 3
    assert buffer.unseen({engine_id: 3}) == {"engine_id": engine_id, "seq": 3, "batches": []}


def test_a_streams_first_chunk_brings_the_batches_the_router_lacks(config, first_engine):
    """A replica answers a request's KV cursors with the batches after them on the stream's
    first chunk, its prompt's blocks among them; replies that come late change nothing
    already applied, and one overlapping the index adds only what is new."""
    engine = AsyncEngine(config, engine=_fresh_engine(config, first_engine, max_batches=1024))
    server = LLMServer(config, "m", lambda _: engine)
    index = KVIndex()
    first, second = _prompts(num_tenants=2, num_users=1, seed=5)

    async def first_chunk(prompt: list[int]) -> StreamChunk:
        routing = RoutingRequest("r", prompt_token_ids=(tuple(prompt),),
                                 kv_cursors=index.cursors())
        body = CompletionRequest(prompt=prompt, max_tokens=3, stream=True)
        items = [item async for item in server.completions(body, routing=routing)]
        assert all(item.kv_events is None for item in items[1:])
        return items[0]

    async def scenario() -> None:
        index.apply(REPLICA, engine.kv_events_since())  # an empty cache: the cursor
        start = index.cursor(REPLICA)
        chunk = await first_chunk(first)
        assert "batches" in chunk.kv_events
        index.apply(REPLICA, chunk.kv_events)
        blocks = hash_prompt_blocks(first, BLOCK_SIZE)
        assert index.match(blocks) == {REPLICA: len(blocks)}
        seen = index.cursor(REPLICA)
        index.apply(REPLICA, chunk.kv_events)  # again, as if late: nothing to do
        assert index.cursor(REPLICA) == seen and index.num_snapshots == 1

        await first_chunk(second)  # not applied: the index is behind
        index.apply(REPLICA, engine.kv_events_since(*start))  # overlaps what it has
        assert index.cursor(REPLICA)[1] == engine.engine.core.kv_events.seq
        await engine.shutdown()

    asyncio.run(scenario())
    _assert_mirrors(index, engine.engine)
    assert index.num_snapshots == 1
