"""The engine replica's OpenAI logic, in-process over the fake engine (no Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from conftest import small_config
from fake_engine import CRASH_MARKER, DIE_AFTER_TOKENS, DIE_MARKER, FakeEngine, expected_text

from fleetlm.cluster.config import to_engine_config
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.migration import Resume, StreamChunk, merge_progress
from fleetlm.cluster.openai_protocol import ChatCompletionRequest, CompletionRequest
from fleetlm.cluster.server import LLMServer
from fleetlm.executor.input_processor import fan_out

USER = [{"role": "user", "content": "hi"}]
CHAT_PROMPT_LEN = len("<user>hi\n<assistant>")
WAIT_S = 10.0


def _server(**engine) -> LLMServer:
    config = small_config(engine=engine)
    return LLMServer(to_engine_config(config), "fake", FakeEngine, replica_id="r0")


async def _collect(stream, limit: int | None = None) -> list:
    items = []
    async for item in stream:
        items.append(item)
        if limit is not None and len(items) == limit:
            await stream.aclose()
            break
    return items


def _run(stream) -> list:
    return asyncio.run(_collect(stream))


def _events(items: list[StreamChunk]) -> list:
    assert all(isinstance(item, StreamChunk) for item in items)
    assert [item.is_last for item in items] == [False] * (len(items) - 1) + [True]
    text = "".join(item.text for item in items)
    assert text.endswith("data: [DONE]\n\n")
    parts = [p.removeprefix("data: ") for p in text.split("\n\n") if p]
    return [json.loads(p) for p in parts[:-1]]


def _chat(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **body})


def test_chat_whole_response():
    [body] = _run(_server().chat(_chat(max_tokens=5)))
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected_text(CHAT_PROMPT_LEN, 5)}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": CHAT_PROMPT_LEN, "completion_tokens": 5,
                             "total_tokens": CHAT_PROMPT_LEN + 5}  # fmt: skip


def test_chat_stream_deltas_add_up_and_end_with_usage():
    request = _chat(max_tokens=6, stream=True, stream_options={"include_usage": True})
    events = _events(_run(_server().chat(request)))
    *chunks, usage = events
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == expected_text(CHAT_PROMPT_LEN, 6)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


def test_chat_n_choices_and_logprobs():
    [body] = _run(_server().chat(_chat(max_tokens=3, n=2, logprobs=True, top_logprobs=2)))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    content = body["choices"][1]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == list(expected_text(CHAT_PROMPT_LEN, 3))
    assert content[0]["logprob"] == -0.5
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-1.0, -2.0]
    assert body["usage"]["completion_tokens"] == 6


def test_completion_echo_logprobs_for_loglikelihood():
    """lm-eval sends token ids with echo and logprobs=1 and reads token_logprobs."""
    prompt = [104, 101, 108, 108, 111]  # "hello"
    request = CompletionRequest(prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    [body] = _run(_server().completions(request))
    [choice] = body["choices"]
    logprobs = choice["logprobs"]
    assert choice["text"] == "hello" + expected_text(5, 1)
    assert logprobs["tokens"] == ["h", "e", "l", "l", "o", expected_text(5, 1)]
    assert logprobs["token_logprobs"] == [None, -0.5, -0.5, -0.5, -0.5, -0.5]
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1] == {"e": -0.5, "\x00": -1.0}
    assert logprobs["text_offset"] == [0, 1, 2, 3, 4, 5]


def test_completion_batched_prompts_with_n():
    request = CompletionRequest(prompt=["ab", "abcd"], max_tokens=2, n=2)
    [body] = _run(_server().completions(request))
    texts = [c["text"] for c in body["choices"]]
    assert texts == [expected_text(2, 2)] * 2 + [expected_text(4, 2)] * 2
    assert body["usage"]["prompt_tokens"] == 6  # each prompt once, not once per choice


def test_n_choices_follow_the_engines_own_fan_out_rule():
    """The serving layer runs each choice as its own engine request, with the ids and seeds
    the engine gives the children of an n > 1 request."""
    server = _server()
    request = CompletionRequest(prompt="abc", max_tokens=2, n=3, seed=7)
    _run(server.completions(request, "cmpl-x"))
    params = dataclasses.replace(request.to_sampling_params(), output_kind="delta")  # served
    expected = fan_out("cmpl-x", params)
    assert sorted(server.engine.requests) == expected
    assert [params.seed for _, params in expected] == [7, 8, 9]


def test_completion_stop_string():
    text = expected_text(3, 10)
    request = CompletionRequest(prompt="abc", max_tokens=10, stop=[text[4:6]])
    [body] = _run(_server().completions(request))
    assert body["choices"][0]["text"] == text[:4]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("request_body", "status"),
    [
        (_chat(messages=[{"role": "wizard", "content": "x"}]), 400),
        (CompletionRequest(prompt="x" * 600), 400),
        (CompletionRequest(prompt=[1, 2, 999]), 200),  # the fake accepts any id < its limit
    ],
)
def test_errors_come_back_as_values(request_body, status):
    server = _server()
    method = server.chat if isinstance(request_body, ChatCompletionRequest) else server.completions
    [item] = _run(method(request_body))
    if status == 200:
        assert isinstance(item, dict)
    else:
        assert isinstance(item, OpenAIError) and item.status == status


def test_queue_full_is_429():
    server = _server(max_num_seqs=1, max_num_waiting=1)

    async def scenario():
        running = server.completions(CompletionRequest(prompt="a", max_tokens=200, stream=True))
        await running.__anext__()  # running: one token came back
        waiting = asyncio.ensure_future(_collect(server.completions(CompletionRequest(prompt="b"))))
        await asyncio.wait_for(_until(lambda: server.stats().num_waiting == 1), WAIT_S)
        [rejected] = await _collect(server.completions(CompletionRequest(prompt="c")))
        await running.aclose()
        return rejected, await waiting

    rejected, [served] = asyncio.run(scenario())
    assert isinstance(rejected, OpenAIError) and rejected.status == 429
    assert rejected.code == "queue_full"
    assert served["choices"][0]["finish_reason"] == "length"


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_a_crashed_engine_answers_503():
    server = _server()
    [crashed] = _run(server.completions(CompletionRequest(prompt=CRASH_MARKER)))
    assert crashed.status == 503
    [dead] = _run(server.completions(CompletionRequest(prompt="x")))
    assert dead.status == 503 and not server.is_healthy()
    with pytest.raises(RuntimeError):
        server.check_health()


def test_closing_the_stream_aborts_and_frees_blocks():
    server = _server()
    request = CompletionRequest(prompt="abc", max_tokens=300, stream=True)
    items = _run_partial(server, request, num_items=3)
    assert len(items) == 3
    stats = server.stats()
    assert (stats.num_running, stats.kv_cache_usage) == (0, 0.0)
    snapshot = server.metrics_snapshot()
    assert snapshot["request_success"] == {"abort": 1}


def _run_partial(server: LLMServer, request, num_items: int) -> list:
    return asyncio.run(_collect(server.completions(request), limit=num_items))


def test_metrics_snapshot_counts_requests():
    server = _server()
    for _ in range(2):
        _run(server.chat(_chat(max_tokens=4)))
    snapshot = server.metrics_snapshot()
    assert snapshot["replica_id"] == "r0" and snapshot["model_name"] == "fake"
    assert snapshot["request_success"] == {"length": 2}
    assert snapshot["counters"]["generation_tokens"] == 8
    assert sum(snapshot["histograms"]["time_to_first_token_seconds"]["counts"]) == 2
    assert sum(snapshot["histograms"]["inter_token_latency_seconds"]["counts"]) == 6


def test_stream_interval_coalesces_tokens():
    """With an interval longer than the request, the first token goes out at once and the
    other 19 together when the request ends (which ends the wait)."""
    config = small_config()
    server = LLMServer(to_engine_config(config), "fake", FakeEngine, stream_interval_s=3600.0)
    request = CompletionRequest(prompt="abc", max_tokens=20, stream=True)
    events = _events(_run(server.completions(request)))
    assert [e["choices"][0]["text"] for e in events] == [
        expected_text(3, 1), expected_text(3, 20)[1:]]


def test_open_streams_share_a_message_budget():
    """Two streams open: each may send every 2 / budget seconds (an hour here), so after the
    first token the rest of each request goes out in one message; a stream that ends, or is
    closed by its client, stops counting."""
    budget = 2 / 3600.0
    server = LLMServer(to_engine_config(small_config()), "fake", FakeEngine,
                       stream_interval_s=0.0, max_stream_messages_per_s=budget)
    assert server.current_stream_interval_s() == 0.0

    async def scenario():
        streams = [server.completions(CompletionRequest(prompt=p, max_tokens=20, stream=True))
                   for p in ("abc", "defg")]  # fmt: skip
        firsts = [await anext(s) for s in streams]
        interval_while_open = server.current_stream_interval_s()
        rests = await asyncio.gather(*(_collect(s) for s in streams))
        return [[first, *rest] for first, rest in zip(firsts, rests)], interval_while_open

    items, interval_while_open = asyncio.run(scenario())
    assert interval_while_open == pytest.approx(2 / budget)
    for prompt_len, request_items in zip((3, 4), items):
        assert [e["choices"][0]["text"] for e in _events(request_items)] == [
            expected_text(prompt_len, 1), expected_text(prompt_len, 20)[1:]]
    assert server.num_streaming == 0 and server.current_stream_interval_s() == 0.0
    _run_partial(server, CompletionRequest(prompt="abc", max_tokens=20, stream=True), 1)
    assert server.num_streaming == 0  # its client went away after the first message


def test_continuous_usage_counts_tokens_so_far():
    request = CompletionRequest(prompt="abc", max_tokens=4, stream=True,
                                stream_options={"continuous_usage_stats": True})  # fmt: skip
    events = _events(_run(_server().completions(request)))
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 4
    assert all(e["usage"]["prompt_tokens"] == 3 for e in events)


def test_requests_arriving_together_cannot_overfill_the_queue():
    """The engine counts a request as waiting only later; the server's own count closes that gap."""
    server = _server(max_num_seqs=1, max_num_waiting=2)

    async def scenario():
        streams = [server.completions(CompletionRequest(prompt="a", max_tokens=3))
                   for _ in range(5)]  # fmt: skip
        return await asyncio.gather(*(_collect(s) for s in streams))

    results = [item for [item] in asyncio.run(scenario())]
    rejected = [r.status for r in results if isinstance(r, OpenAIError)]
    served = [r["choices"][0]["finish_reason"] for r in results if isinstance(r, dict)]
    # Conservative: a request counts as waiting until its first output, so two get in.
    assert (rejected, served) == ([429] * 3, ["length"] * 2)
    assert server.num_pending == 0


# ---- what a replica reports for migration, and resuming from it ---------------------------


def test_chunks_carry_the_token_ids_behind_their_text():
    request = CompletionRequest(prompt="abc", max_tokens=6, stream=True)
    items = _run(_server().completions(request))
    progress = {}
    for item in items:
        merge_progress(progress, item)
    [choice] = progress.values()
    assert bytes(choice.token_ids).decode() == expected_text(3, 6)
    assert (choice.num_chars, choice.num_prompt_tokens, choice.finish_reason) == (6, 3, "length")


def _interrupted(server: LLMServer, request, stop_when) -> tuple[list, dict]:
    """The items a client got before `stop_when(progress)` held, and that progress."""

    async def scenario():
        stream = getattr(server, "chat" if isinstance(request, ChatCompletionRequest)
                         else "completions")(request, "req-1")  # fmt: skip
        items, progress = [], {}
        async for item in stream:
            items.append(item)
            merge_progress(progress, item)
            if stop_when(progress):
                break
        await stream.aclose()
        return items, progress

    return asyncio.run(scenario())


def test_a_resumed_chat_stream_continues_the_interrupted_one():
    request = _chat(max_tokens=12, stream=True, stream_options={"include_usage": True})
    before, progress = _interrupted(_server(), request, lambda p: p[0].num_tokens >= 5)
    after = _run(_server().chat(request, "req-1", Resume(progress, 1)))
    *chunks, usage = _events(before + after)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == (
        expected_text(CHAT_PROMPT_LEN, 12))
    assert ["role" in c["choices"][0]["delta"] for c in chunks].count(True) == 1
    assert {c["id"] for c in chunks} == {"req-1"}
    assert usage["usage"]["completion_tokens"] == 12
    assert usage["usage"]["prompt_tokens"] == CHAT_PROMPT_LEN


def test_resume_skips_finished_choices_and_counts_them_in_usage():
    text_a, text_b = expected_text(2, 6), expected_text(4, 6)
    stop = "g"  # choice 0 ("cdefg...") stops after 4 characters, choice 1 ("efg...") after 2
    request = CompletionRequest(prompt=["ab", "abcd"], max_tokens=6, stop=[stop], stream=True,
                                stream_options={"include_usage": True})  # fmt: skip
    before, progress = _interrupted(
        _server(), request, lambda p: 1 in p and p[1].is_finished and 0 in p)
    assert not progress[0].is_finished
    server = _server()
    after = _run(server.completions(request, "req-1", Resume(progress, 1)))
    *chunks, usage = _events(before + after)
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == {0: text_a[: text_a.index(stop)], 1: text_b[: text_b.index(stop)]}
    assert usage["usage"]["prompt_tokens"] == 6
    assert usage["usage"]["completion_tokens"] == 5 + 3  # the stop tokens count too
    assert server.stats().num_generation_tokens == 5 - progress[0].num_tokens


def test_an_engine_dying_mid_stream_ends_the_stream_with_an_engine_dead_item():
    request = CompletionRequest(prompt=DIE_MARKER, max_tokens=10, stream=True)
    items = _run(_server().completions(request))
    *chunks, error = items
    assert all(isinstance(c, StreamChunk) and not c.is_last for c in chunks)
    assert isinstance(error, OpenAIError) and error.code == "engine_dead"
    progress = {}
    for chunk in chunks:
        merge_progress(progress, chunk)
    assert progress[0].num_tokens <= DIE_AFTER_TOKENS
