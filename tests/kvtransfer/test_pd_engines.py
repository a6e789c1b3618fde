"""Disaggregated prefill/decode on real engines (the built-in model, float32): a decode
engine that reads the prompt's KV from a prefill engine generates exactly the greedy tokens
of one colocated engine, over each transport; when the transfer stalls, breaks, is refused
or its source is gone, the request is recomputed (or fails cleanly under the fail policy),
never hangs and never returns garbage. After every test both sides' blocks are all free
and no lease or load is left."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from pd_helpers import (
    ENGINE,
    LENGTHS,
    MAX_TOKENS,
    PREFIX_LENGTH,
    black_hole,
    engine,
    generate,
    prefill,
    prompt_for,
    redirected,
    release,
    tokens,
)

from fleetlm.executor.async_engine import AsyncEngine
from fleetlm.executor.llm import make_engine_config
from fleetlm.executor.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engines():
    """The colocated reference, a decode engine, and a prefill engine per transport; the
    in-process one is a consumer too, with the fail policy and short timeouts."""
    llms = {
        "reference": engine(),
        "decode": engine(role="consumer", transfer_timeout_s=2.0),
        "tcp": engine(role="producer", transport="tcp"),
        "shm": engine(role="producer", transport="shm"),
        "dist": engine(role="producer", transport="dist"),
        "inproc": engine(role="both", transport="inproc", failure_policy="fail",
                         lease_timeout_s=1.0, transfer_timeout_s=1.0),
    }
    yield llms
    for llm in llms.values():
        llm.shutdown()


_reference_tokens: dict[tuple[int, ...], list[int]] = {}


def reference(engines, prompt: list[int]) -> list[int]:
    key = tuple(prompt)
    if key not in _reference_tokens:
        _reference_tokens[key] = generate(engines["reference"], prompt).outputs[0].token_ids
    return _reference_tokens[key]


@pytest.mark.parametrize(("salt", "transport", "kind"), [
    *[(salt, "tcp", kind) for salt, kind in enumerate(LENGTHS)],
    (4, "inproc", "longer_than_a_chunk"), (5, "shm", "longer_than_a_chunk"),
    (6, "dist", "longer_than_a_chunk"),
])
def test_decode_from_the_prefill_engines_kv_equals_colocated(engines, salt, transport, kind):
    decode = engines["decode"]
    prompt = prompt_for(kind, salt)
    num_local_tokens = 0
    if kind == "cached_prefix":
        generate(decode, prompt[:PREFIX_LENGTH], max_tokens=1)
        num_local_tokens = PREFIX_LENGTH
    hits_before = decode.engine.core.scheduler.kv_cache_manager.prefix_cache_hits
    params = prefill(engines[transport], prompt)
    assert params["ranks"][0]["address"].startswith(f"{transport}://")
    out = generate(decode, prompt, kv_transfer_params=params)
    assert out.outputs[0].token_ids == reference(engines, prompt)
    # Everything but the last prompt token came from the local cache or the prefill engine.
    assert out.num_cached_tokens == len(prompt) - 1
    hits = decode.engine.core.scheduler.kv_cache_manager.prefix_cache_hits - hits_before
    assert hits == num_local_tokens


def test_a_stalled_transfer_is_recomputed_after_its_timeout_without_spinning(engines):
    decode, prompt = engines["decode"], prompt_for("short", 11)
    params = prefill(engines["tcp"], prompt)
    with black_hole() as hole:
        steps_before = decode.engine.core.scheduler.num_steps
        out = generate(decode, prompt, kv_transfer_params=redirected(
            params, f"tcp://127.0.0.1:{hole.getsockname()[1]}"))
    assert out.outputs[0].token_ids == reference(engines, prompt)
    assert out.num_cached_tokens == 0  # nothing loaded counts
    # Admit and start the load, wait (blocked, no steps) for the timeout, collect it, then
    # the prompt and MAX_TOKENS - 1 decode steps.
    assert decode.engine.core.scheduler.num_steps - steps_before <= 3 + MAX_TOKENS
    release(params)


def test_a_stalled_transfer_fails_the_request_under_the_fail_policy(engines):
    decode, prompt = engines["inproc"], prompt_for("short", 12)
    params = prefill(engines["tcp"], prompt)
    with black_hole() as hole:
        out = generate(decode, prompt, kv_transfer_params=redirected(
            params, f"tcp://127.0.0.1:{hole.getsockname()[1]}"))
    completion = out.outputs[0]
    assert (completion.finish_reason, completion.token_ids) == ("error", [])
    assert completion.stop_reason.startswith("KV transfer failed: timeout")
    release(params)
    out = generate(decode, prompt)  # the engine goes on serving
    assert out.outputs[0].token_ids == reference(engines, prompt)


def test_a_corrupted_answer_is_recomputed(engines):
    decode, prompt = engines["decode"], prompt_for("short", 13)
    params = prefill(engines["tcp"], prompt)
    with socket.create_server(("127.0.0.1", 0)) as liar:
        def answer_garbage():
            conn, _ = liar.accept()
            with conn:
                conn.recv(1 << 16)
                conn.sendall(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # not msgpack

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        out = generate(decode, prompt, kv_transfer_params=redirected(
            params, f"tcp://127.0.0.1:{liar.getsockname()[1]}"))
        thread.join()
    assert out.outputs[0].token_ids == reference(engines, prompt)
    assert out.num_cached_tokens == 0
    release(params)


def test_a_prefill_engine_gone_before_the_read_is_recomputed(engines):
    decode, prompt = engines["decode"], prompt_for("short", 14)
    params = prefill(engines["tcp"], prompt)
    with socket.create_server(("127.0.0.1", 0)) as gone:
        address = f"tcp://127.0.0.1:{gone.getsockname()[1]}"
    out = generate(decode, prompt, kv_transfer_params=redirected(params, address))
    assert out.outputs[0].token_ids == reference(engines, prompt)
    assert out.num_cached_tokens == 0
    release(params)


def test_an_unread_lease_expires_and_frees_the_prefill_blocks(engines):
    """The decode side never came (or died mid-read): the prefill engine frees the blocks
    when the lease expires, and a late read is refused, so the decode side recomputes."""
    producer, prompt = engines["inproc"], prompt_for("block_multiple", 15)
    params = prefill(producer, prompt)
    manager = producer.engine.core.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks - 2  # 16 tokens: 2 blocks leased
    producer.engine.core.kv_transfer.wait_for_news()  # the reaper ends the lease
    producer.engine.step()
    assert manager.num_free_blocks == manager.num_blocks
    out = generate(engines["decode"], prompt, kv_transfer_params=params)
    assert out.outputs[0].token_ids == reference(engines, prompt)
    assert out.num_cached_tokens == 0


def test_transfer_params_are_consumed_once(engines, caplog):
    decode, prompt = engines["decode"], prompt_for("longer_than_a_chunk", 16)
    params = prefill(engines["tcp"], prompt)
    first = generate(decode, prompt, kv_transfer_params=params)
    assert first.num_cached_tokens == len(prompt) - 1
    # The same params again: the decode engine has the first two blocks cached now, asks the
    # prefill engine for the third, is refused (consumed) and computes it itself.
    second = generate(decode, prompt, kv_transfer_params=params)
    assert second.outputs[0].token_ids == reference(engines, prompt)
    assert second.num_cached_tokens == 16
    assert "failed: consumed" in caplog.text


def test_prompt_logprobs_are_computed_here_not_loaded(engines):
    decode, prompt = engines["decode"], prompt_for("block_multiple", 21)
    params = prefill(engines["tcp"], prompt)
    out = generate(decode, prompt, kv_transfer_params=params, prompt_logprobs=0)
    assert out.num_cached_tokens == 0
    assert len(out.prompt_logprobs) == len(prompt)
    assert out.outputs[0].token_ids == reference(engines, prompt)


def test_bad_transfer_params_are_the_callers_error(engines):
    params = prefill(engines["tcp"], tokens(4, 18))
    with pytest.raises(ValueError, match="kv_transfer_params.num_tokens"):
        engines["decode"].engine.add_request(
            "bad", tokens(4, 18), SamplingParams(max_tokens=1),
            kv_transfer_params={**params, "num_tokens": -1})
    release(params)


def test_the_async_engine_serves_new_requests_while_a_transfer_stalls(engines):
    """The engine thread blocks while only a transfer is pending; a new request wakes it at
    once instead of waiting for the transfer's timeout."""
    stalled_prompt, prompt = prompt_for("short", 19), prompt_for("short", 20)
    params = prefill(engines["tcp"], stalled_prompt)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)

    async def last(outputs):
        async for out in outputs:
            result = out
        return result

    async def scenario(engine: AsyncEngine, waiting: threading.Event):
        with black_hole() as hole:
            stalled = asyncio.ensure_future(last(engine.generate(
                stalled_prompt, greedy, "stalled", kv_transfer_params=redirected(
                    params, f"tcp://127.0.0.1:{hole.getsockname()[1]}"))))
            assert await asyncio.to_thread(waiting.wait, 60)
            out = await last(engine.generate(prompt, greedy, "other"))
            assert engine.engine.core.scheduler.num_loading == 1  # the transfer still stalls
            stalled.cancel()  # the caller goes away: the load is cancelled with the request
            return out

    async def main():
        engine = AsyncEngine(make_engine_config(**ENGINE, kv_transfer_config={
            "role": "consumer", "transfer_timeout_s": 600}))
        kv_transfer = engine.engine.core.kv_transfer
        waiting = threading.Event()
        wait_for_news = kv_transfer.wait_for_news

        def spied_wait() -> None:  # the real wait, telling the test it started
            waiting.set()
            wait_for_news()

        kv_transfer.wait_for_news = spied_wait
        try:
            return await scenario(engine, waiting)
        finally:
            await engine.shutdown()
            assert kv_transfer.num_active_loads == 0

    out = asyncio.run(main())
    assert out.outputs[0].token_ids == reference(engines, prompt)
    release(params)
