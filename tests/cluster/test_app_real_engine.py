"""The Serve application with fleetlm's own engine and the built-in model, over HTTP.

Greedy answers through HTTP must equal the offline engine's for the same prompts, the load of
32 concurrent streams must drain completely, and an abandoned stream must leave no KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import openai
import pytest
import requests
from conftest import small_config
from prometheus_client.parser import text_string_to_metric_families

from fleetlm.bench.cli import main as bench_main
from fleetlm.cluster.app import build_app, deployment_name
from fleetlm.cluster.config import load_config
from fleetlm.executor.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
APP = "real"
MODEL = "smollm2-135m-instruct"
ENGINE = {"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 32, "max_num_batched_tokens": 512}
MAX_MODEL_LEN = 512
NUM_TOKENS = 8
TIMEOUT_S = 300.0
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
CONVERSATION = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def config():
    base = load_config(CONFIGS / "default.yaml")
    return small_config(base, engine=ENGINE, model={"max_model_len": MAX_MODEL_LEN})


@pytest.fixture(scope="module")
def real(http_port, config):
    from ray import serve

    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"http://127.0.0.1:{http_port}/{APP}"
    serve.delete(APP)


@pytest.fixture
def real_in_replica(http_port, config):
    """The same engine with the routes in its replica (`http.ingress: in_replica`)."""
    from ray import serve

    app = f"{APP}-in-replica"
    serve.run(build_app(small_config(config, http={"ingress": "in_replica"})), name=app,
              route_prefix=f"/{app}")
    yield f"http://127.0.0.1:{http_port}/{app}"
    serve.delete(app)


@pytest.fixture(scope="module")
def offline():
    from fleetlm.executor.llm import LLM

    return LLM(MODEL, max_model_len=MAX_MODEL_LEN, **ENGINE)


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=TIMEOUT_S)


def _greedy(max_tokens: int = NUM_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_greedy_completions_equal_the_offline_engine(real, offline):
    # One prompt at a time, as the client sends them: in bf16 a token's rounding may depend on
    # its batch where the CPU has no bf16_gemm (a one-row product takes fleetlm's GEMV, a batch
    # oneDNN's GEMM).
    expected = [offline.generate([p], _greedy())[0].outputs[0].text for p in PROMPTS]
    client = _client(real)
    got = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=NUM_TOKENS, temperature=0)
        .choices[0].text
        for p in PROMPTS
    ]
    assert got == expected


def test_greedy_chat_stream_equals_the_offline_engine(real, offline):
    [expected] = offline.chat(CONVERSATION, _greedy())
    stream = _client(real).chat.completions.create(
        model=MODEL, messages=CONVERSATION, max_tokens=NUM_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected.outputs[0].text
    )
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)


def test_routes_in_the_replica_answer_as_the_offline_engine(real_in_replica, offline):
    expected = [offline.generate([p], _greedy())[0].outputs[0].text for p in PROMPTS]
    client = _client(real_in_replica)
    got = [
        "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=MODEL, prompt=p, max_tokens=NUM_TOKENS, temperature=0, stream=True))
        for p in PROMPTS
    ]
    assert got == expected
    [chat] = offline.chat(CONVERSATION, _greedy())
    reply = client.chat.completions.create(model=MODEL, messages=CONVERSATION,
                                           max_tokens=NUM_TOKENS, temperature=0)  # fmt: skip
    assert reply.choices[0].message.content == chat.outputs[0].text


def test_32_concurrent_streams_finish(real):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model=MODEL, prompt=f"Count to {i}:", max_tokens=4, stream=True
        )
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{real}/v1", api_key="unused", timeout=TIMEOUT_S)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert all(reason in ("length", "stop") and text for text, reason in results)


def _server_ttft(base_url: str) -> tuple[float, float]:
    """(sum of seconds, count) of the server's own time-to-first-token histogram."""
    text = requests.get(f"{base_url}/metrics", timeout=TIMEOUT_S).text
    [family] = [f for f in text_string_to_metric_families(text)
                if f.name == "fleetlm:time_to_first_token_seconds"]
    values = {s.name.rsplit("_", 1)[1]: s.value for s in family.samples
              if s.name.endswith(("_sum", "_count"))}
    return values["sum"], values["count"]


def test_bench_client_measures_the_real_app(real, tmp_path):
    """`fleetlm bench serve` against the real app: every request delivers exactly its tokens,
    `usage` agrees with the tokenizer within re-tokenization noise, and the client's TTFT
    (which includes HTTP) is never below the engine's own."""
    num_prompts = 4
    sum_before, count_before = _server_ttft(real)
    argv = ["serve", "--base-url", real, "--model", MODEL, "--workload", "random",
            "--num-prompts", str(num_prompts), "--input-len", "32",
            "--output-len", str(NUM_TOKENS), "--max-concurrency", "2", "--tokenizer", MODEL,
            "--continuous-usage", "--result-dir", str(tmp_path), "--disable-tqdm"]
    assert bench_main(argv) == 0
    sum_after, count_after = _server_ttft(real)

    [point] = json.loads((tmp_path / "results.json").read_text())["results"]
    assert point["num_completed"] == num_prompts and point["num_failed"] == 0
    assert point["total_output_tokens"] == num_prompts * NUM_TOKENS
    assert point["max_in_flight"] == 2
    rows = point["requests"]
    for row in rows:
        assert row["usage_completion_tokens"] == NUM_TOKENS and row["error"] is None
        assert abs(row["tokenizer_completion_tokens"] - NUM_TOKENS) <= 2
        assert abs(row["usage_prompt_tokens"] - 32) <= 2
        assert 0 < len(row["itl_ms"]) <= NUM_TOKENS - 1
        assert 0 < row["ttft_ms"] <= row["e2el_ms"]
        assert row["ttft_ms"] + sum(row["itl_ms"]) <= row["e2el_ms"] + 1e-6
    assert count_after - count_before == num_prompts
    client_ttft_s = sum(row["ttft_ms"] for row in rows) / 1000.0
    assert 0 < sum_after - sum_before <= client_ttft_s
    assert point["output_throughput"] == pytest.approx(
        point["total_output_tokens"] / point["duration_s"])


def test_echo_gives_prompt_logprobs(real):
    token_ids = [504, 3575, 282, 4649, 314]  # any in-vocabulary ids
    reply = requests.post(f"{real}/v1/completions", timeout=TIMEOUT_S, json={
        "prompt": token_ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
    }).json()  # fmt: skip
    logprobs = reply["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(token_ids) + 1
    assert logprobs["token_logprobs"][0] is None
    assert all(lp <= 0.0 for lp in logprobs["token_logprobs"][1:])
    assert all(len(top) >= 1 for top in logprobs["top_logprobs"][1:])


def test_the_router_learns_each_replicas_cache_size(real, offline):
    from ray import serve

    handle = serve.get_deployment_handle(deployment_name(), APP)
    stats = handle.record_routing_stats.remote().result()
    assert stats["num_kv_blocks"] == offline.engine.stats().num_kv_blocks > 0


def test_disconnect_leaves_no_blocks_in_use(real):
    from ray import serve

    handle = serve.get_deployment_handle(deployment_name(), APP)
    body = {"prompt": "Tell me a long story.", "max_tokens": MAX_MODEL_LEN // 2, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with requests.post(f"{real}/v1/completions", json=body, stream=True, timeout=TIMEOUT_S) as r:
        # Kept: a discarded line iterator closes the connection when collected, which is the
        # disconnect itself, racing the check below.
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")
        assert handle.stats.remote().result().kv_cache_usage > 0.0
    deadline = time.monotonic() + TIMEOUT_S
    while (stats := handle.stats.remote().result()).num_running:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.05)
    assert (stats.num_waiting, stats.kv_cache_usage) == (0, 0.0)


def test_web_page_streams_a_real_answer_in_chromium(real, offline, tmp_path):
    """End to end: the chat page served by the real app, in headless Chromium."""
    import browser

    reason = browser.ensure_chromium()
    if reason:
        pytest.skip(reason)
    question = "What is the capital of France? Answer in one sentence."
    with browser.chromium_page(tmp_path / "chromium") as page:
        assert browser.open_chat(page, real) == MODEL
        browser.watch_replies(page)
        browser.set_settings(page, temperature=0, max_tokens=24)
        browser.send_message(page, question)
        reply = browser.wait_for_reply(page, 0, timeout_ms=int(TIMEOUT_S * 1000))
        updates = browser.reply_updates(page, 0)
        page.screenshot(path=str(tmp_path / "chat.png"))
    assert reply.state == "done" and "Paris" in reply.text
    assert len(updates) > 1  # streamed token by token, not delivered at the end
    assert reply.ttft_ms is not None and reply.tokens_per_s is not None
