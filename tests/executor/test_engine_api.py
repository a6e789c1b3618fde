"""The offline and async APIs on the built-in model: streaming, abort, n > 1, seeds, stop
strings, logprobs and bad input. One engine per module (the model loads in seconds)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.executor.async_engine import AsyncEngine
from fleetlm.executor.engine import LLMEngine
from fleetlm.executor.llm import make_engine_config
from fleetlm.executor.scheduler import SchedulerQueueFullError

PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", kv_cache_memory_bytes=128 << 20)


@pytest.fixture(scope="module")
def engine(llm):
    """An async engine sharing the offline engine's model (loads once per module)."""
    config = make_engine_config("smollm2-135m-instruct", dtype="float32")
    engine = AsyncEngine(config, engine=llm.engine)
    yield engine
    asyncio.run(engine.shutdown())


def kv_blocks_in_use(llm: LLM) -> int:
    manager = llm.engine.core.scheduler.kv_cache_manager
    manager.check_invariants()
    return manager.block_pool.num_blocks - manager.num_free_blocks


def chat_prompt(llm: LLM, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def test_chat_uses_the_template_and_answers(llm):
    out = llm.chat([{"role": "user", "content": PROMPT}], SamplingParams(temperature=0))
    assert out[0].outputs[0].text.startswith("The capital of France is Paris")
    assert out[0].outputs[0].finish_reason == "stop"  # EOS (<|im_end|>) before 16 tokens


def test_stop_string_is_not_leaked(llm):
    params = SamplingParams(temperature=0, stop=["Paris"], max_tokens=30)
    out = llm.chat([{"role": "user", "content": PROMPT}], params)[0].outputs[0]
    assert out.text == "The capital of France is "
    assert (out.finish_reason, out.stop_reason) == ("stop", "Paris")
    assert kv_blocks_in_use(llm) == 0


def test_max_tokens_min_tokens_and_ignore_eos(llm):
    prompt = chat_prompt(llm, PROMPT)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                stop_token_ids=[]))[0].outputs[0]
    assert len(out.token_ids) == 40 and out.finish_reason == "length"
    eos = llm.get_tokenizer().eos_token_id
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, min_tokens=25))
    tokens = out[0].outputs[0].token_ids
    assert len(tokens) >= 25 and eos not in tokens[:25]


def test_seeded_sampling_repeats_whatever_the_batch(llm):
    prompt = chat_prompt(llm, "Tell me a short story.")
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_tokens=24)
    alone = llm.generate([prompt], params)[0].outputs[0].token_ids
    others = [chat_prompt(llm, f"Count to {i}.") for i in range(5)]
    batch = llm.generate(others[:2] + [prompt] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=24)] * 2 + [params]
                         + [SamplingParams(temperature=0.7, max_tokens=24)] * 3)
    assert batch[2].outputs[0].token_ids == alone
    different = llm.generate([prompt], SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=99,
                                                      max_tokens=24))
    assert different[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_blocks(llm):
    prompt = chat_prompt(llm, "Name a colour. " * 20)
    before = llm.engine.stats().prefix_cache_hits
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12))
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out[0].outputs}) == 3
    full_blocks = (len(prompt) - 1) // 16 * 16
    assert llm.engine.stats().prefix_cache_hits - before >= 2 * full_blocks
    again = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12))
    assert [c.token_ids for c in again[0].outputs] == [c.token_ids for c in out[0].outputs]


def test_logprobs_and_prompt_logprobs(llm):
    prompt = chat_prompt(llm, PROMPT)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                prompt_logprobs=2))[0]
    logprobs = out.outputs[0].logprobs
    assert len(logprobs) == 5
    for token, position in zip(out.outputs[0].token_ids, logprobs):
        assert position[0][0] == token and len(position) == 4
        assert position[0][1] == pytest.approx(max(lp for _, lp in position[1:]))  # greedy
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    assert all(entry[0][0] == tok for entry, tok in zip(out.prompt_logprobs[1:], prompt[1:]))


@pytest.mark.parametrize("field, kwargs", [
    ("temperature", dict(temperature=-0.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("max_tokens", dict(max_tokens=0)),
    ("n", dict(n=0)),
])
def test_impossible_sampling_values_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_other_requests_keep_running(engine, llm):
    async def scenario():
        stream = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                 "good")
        first = await anext(stream)
        with pytest.raises(ValueError, match="empty"):
            await anext(engine.generate("", SamplingParams(), "empty"))
        with pytest.raises(ValueError, match="context length"):
            await anext(engine.generate([5] * engine.max_model_len, SamplingParams(), "long"))
        with pytest.raises(ValueError, match="stop_token_ids"):
            await anext(engine.generate(PROMPT, SamplingParams(stop_token_ids=[10**6]), "stop"))
        last = first
        async for last in stream:
            pass
        return last

    last = asyncio.run(scenario())
    assert last.finished and len(last.outputs[0].token_ids) == 20
    assert kv_blocks_in_use(llm) == 0


def test_concurrent_streams_match_offline_outputs(engine, llm):
    prompts = [chat_prompt(llm, f"Give me {i} reasons to learn Python.") for i in range(1, 9)]
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    async def one(i):
        chunks = []
        async for out in engine.generate(prompts[i], params, f"stream-{i}"):
            chunks.append(out.outputs[0].token_ids)
        return chunks

    async def all_streams():
        ticks = 0
        task = asyncio.gather(*(one(i) for i in range(len(prompts))))
        while not task.done():  # the event loop keeps running while the engine computes
            ticks += 1
            await asyncio.sleep(0)
        return await task, ticks

    results, ticks = asyncio.run(all_streams())
    assert [chunks[-1] for chunks in results] == expected
    assert all(len(chunks) > 1 for chunks in results)  # streamed, not delivered at the end
    assert ticks > 100


def test_abort_frees_blocks_at_once(engine, llm):
    async def scenario():
        stream = engine.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True), "a")
        await anext(stream)
        await anext(stream)
        await stream.aclose()  # the client went away: the request is aborted
        # Commands run in order, so once a later request finishes the abort has happened.
        async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=2), "b"):
            pass

    asyncio.run(scenario())
    assert kv_blocks_in_use(llm) == 0
    assert not llm.engine.has_unfinished_requests()


def test_a_full_waiting_queue_rejects_the_request_not_the_engine(llm):
    config = make_engine_config("smollm2-135m-instruct", dtype="float32", max_num_seqs=1,
                                max_num_waiting=1)
    # A second engine core over the idle module engine's model and KV cache tensors.
    engine = AsyncEngine(config, engine=LLMEngine(config, executor=llm.engine.executor))

    async def drain(request_id):
        async for out in engine.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True),
                                         request_id):
            last = out
        return last

    async def scenario():
        return await asyncio.gather(*(drain(f"q{i}") for i in range(4)),
                                    return_exceptions=True)

    results = asyncio.run(scenario())
    rejected = [r for r in results if isinstance(r, SchedulerQueueFullError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    # How many fit depends on whether the engine stepped between arrivals; never all of them.
    assert len(rejected) >= 1 and len(served) >= 1 and len(rejected) + len(served) == 4
    assert engine.is_healthy
    assert asyncio.run(drain("later")).finished  # the engine goes on serving
    asyncio.run(engine.shutdown())


class _CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the callbacks other threads hand it."""

    num_threadsafe_calls = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.num_threadsafe_calls += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_one_wake_up_per_step_for_all_streams(engine, llm):
    num_streams, max_tokens = 8, 12
    prompts = [chat_prompt(llm, f"Count to {i}.") for i in range(num_streams)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind="delta")

    async def one(i):
        return [out async for out in engine.generate(prompts[i], params, f"wake-{i}")]

    async def all_streams():
        return await asyncio.gather(*(one(i) for i in range(num_streams)))

    with asyncio.Runner(loop_factory=_CountingLoop) as runner:
        results = runner.run(all_streams())
        num_calls = runner.get_loop().num_threadsafe_calls
    assert all(sum(len(o.outputs[0].token_ids) for o in r) == max_tokens for r in results)
    # Steps with output: max_tokens once all run together, plus one per step that admitted
    # some of them apart; one wake-up per request per step would be num_streams * max_tokens.
    assert num_calls <= max_tokens + num_streams - 1


def test_delta_streams_add_up_to_the_offline_outputs(engine, llm):
    prompts = [chat_prompt(llm, f"Name {i} French cities.") for i in range(1, 5)]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2, stop=["Paris"])
    expected = llm.generate(prompts, params)

    async def one(i):
        text, token_ids, logprobs = "", [], []
        async for out in engine.generate(prompts[i], dataclasses.replace(
                params, output_kind="delta"), f"delta-{i}"):
            completion = out.outputs[0]
            assert out.is_delta
            text += completion.text
            token_ids += completion.token_ids
            logprobs += completion.logprobs
        return text, token_ids, logprobs, completion.finish_reason, completion.stop_reason

    async def all_streams():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    got = asyncio.run(all_streams())
    assert [(text, ids, finish, stop) for text, ids, _, finish, stop in got] == \
        [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason,
          o.outputs[0].stop_reason) for o in expected]
    for _, token_ids, logprobs, _, _ in got:  # one position per token, in order
        assert [position[0][0] for position in logprobs] == token_ids
