"""The real Ray Serve application over HTTP, with the fake engine in each replica.

Apps share the session's proxy: `two` is configs/two-replicas.yaml (round-robin, plus an
API key), `tight` has one replica that runs one request at a time and queues at most one;
`moving` (two replicas), `lonely` (one) and `stranded` (one, migration off) lose engines
mid-stream, and wait until Serve has replaced them before each test; `doomed` is one test's
own app, whose engine it crashes for good.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import json

import actors
import openai
import pytest
import replicas
import requests
from conftest import small_config, wait_until
from fake_engine import (
    CRASH_MARKER,
    DIE_AFTER_TOKENS,
    DIE_MARKER,
    DIE_ONCE_MARKER,
    FakeEngine,
    expected_text,
)
from prometheus_client.parser import text_string_to_metric_families

from fleetlm.cluster.app import build_app
from fleetlm.cluster.ingress import HEALTH_PROBE_TIMEOUT_S, METRICS_TIMEOUT_S
from fleetlm.cluster.config import load_config

pytestmark = pytest.mark.slow  # a Ray cluster and two Serve apps: tens of seconds on 2 cores
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL = "smollm2-135m-instruct"
API_KEY = "sk-test-key"
USER = [{"role": "user", "content": "hi"}]
CHAT_PROMPT_LEN = len("<user>hi\n<assistant>")
HUGE_CONTEXT = 1_000_000  # lets a fake request run for minutes unless it is aborted
TIMEOUT_S = 60.0
ERROR_FIELDS = {"message", "type", "param", "code"}


def _deploy(name: str, config) -> None:
    from ray import serve

    serve.run(build_app(config, FakeEngine), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def two(http_port):
    from ray import serve

    base = load_config(CONFIGS / "two-replicas.yaml")
    config = small_config(base, http={"api_keys": [API_KEY]},
                          model={"max_model_len": HUGE_CONTEXT})  # fmt: skip
    _deploy("two", config)
    yield f"http://127.0.0.1:{http_port}/two"
    serve.delete("two")


@pytest.fixture(scope="module")
def tight(http_port):
    from ray import serve

    _deploy("tight", small_config(engine={"max_num_seqs": 1, "max_num_waiting": 1},
                                  model={"max_model_len": HUGE_CONTEXT},
                                  migration={"max_migrations": 0}))  # fmt: skip
    yield f"http://127.0.0.1:{http_port}/tight"
    serve.delete("tight")


@pytest.fixture(scope="module")
def moving(http_port):
    from ray import serve

    _deploy("moving", small_config(replicas={"count": 2}, migration={"timeout_s": TIMEOUT_S}))
    yield f"http://127.0.0.1:{http_port}/moving"
    serve.delete("moving")


@pytest.fixture(scope="module")
def lonely(http_port):
    from ray import serve

    _deploy("lonely", small_config(migration={"timeout_s": TIMEOUT_S}))
    yield f"http://127.0.0.1:{http_port}/lonely"
    serve.delete("lonely")


@pytest.fixture(scope="module")
def stranded(http_port):
    from ray import serve

    _deploy("stranded", small_config(migration={"max_migrations": 0}))
    yield f"http://127.0.0.1:{http_port}/stranded"
    serve.delete("stranded")


def _client(base_url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, timeout=TIMEOUT_S)


def _post(url: str, body=None, key: str | None = API_KEY, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url, json=body, headers=headers, timeout=TIMEOUT_S, **kwargs)


def _replica_stats(app: str, index: int):
    """The engine statistics of the app's `index`th replica (by sorted replica id)."""
    return replicas.ask(app, replicas.replica_ids(app)[index], "stats")


def _assert_ok(base_url: str) -> None:
    reply = _client(base_url).completions.create(model=MODEL, prompt="ok", max_tokens=2)
    assert reply.choices[0].text == expected_text(2, 2)


# ---- OpenAI SDK ---------------------------------------------------------------------------


def test_chat_with_the_sdk(two):
    reply = _client(two).chat.completions.create(model=MODEL, messages=USER, max_tokens=5)
    assert reply.choices[0].message.content == expected_text(CHAT_PROMPT_LEN, 5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_chat_stream_with_the_sdk(two):
    stream = _client(two).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=7, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(CHAT_PROMPT_LEN, 7)
    assert chunks[-1].usage.completion_tokens == 7


def test_completions_with_the_sdk(two):
    client = _client(two)
    reply = client.completions.create(model=MODEL, prompt="abcd", max_tokens=4)
    assert reply.choices[0].text == expected_text(4, 4)
    stream = client.completions.create(model=MODEL, prompt="abcd", max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected_text(4, 4)


def test_models_lists_the_served_model(two):
    [card] = _client(two).models.list().data
    assert card.id == MODEL


def test_32_concurrent_streams_all_finish(two):
    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        prompt = "x" * (i + 1)
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{two}/v1", api_key=API_KEY, timeout=TIMEOUT_S)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(run()) == [expected_text(i + 1, 8) for i in range(32)]


def test_two_replicas_share_requests_round_robin(two):
    before = [_replica_stats("two", i).num_prompt_tokens for i in range(2)]
    for _ in range(4):
        _client(two).completions.create(model=MODEL, prompt="abc", max_tokens=1)
    after = [_replica_stats("two", i).num_prompt_tokens for i in range(2)]
    assert [a - b for a, b in zip(after, before)] == [6, 6]  # two 3-token prompts each


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "key", "status", "param"),
    [
        ({"prompt": "x", "temperature": -1}, API_KEY, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, API_KEY, 400, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, API_KEY, 400, "max_tokens"),
        ({"prompt": "x" * (HUGE_CONTEXT + 1)}, API_KEY, 400, None),
        ({"prompt": "x", "model": "gpt-17"}, API_KEY, 404, "model"),
        ({"prompt": "x"}, None, 401, None),
        ({"prompt": "x"}, "sk-wrong", 401, None),
    ],
    ids=["temperature", "top_p", "max_tokens", "too_long", "model", "no_key", "bad_key"],
)
def test_errors_have_openai_shape_and_do_not_disturb(two, body, key, status, param):
    reply = _post(f"{two}/v1/completions", body, key=key)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == ERROR_FIELDS and error["message"]
    assert error["param"] == param
    _assert_ok(two)


def test_malformed_json_is_400(two):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    reply = requests.post(f"{two}/v1/chat/completions", data=b"{not json", headers=headers,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert reply.status_code == 400
    assert set(reply.json()["error"]) == ERROR_FIELDS
    _assert_ok(two)


def test_chat_without_messages_is_400(two):
    reply = _post(f"{two}/v1/chat/completions", {"messages": []})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"


def test_malformed_earlier_tool_call_is_400(two):
    """schemathesis's find: an assistant message's call without `function` was a 500."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"x": None}]},
                {"role": "user", "content": "and?"}]
    reply = _post(f"{two}/v1/chat/completions", {"messages": messages})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == ERROR_FIELDS and "tool_calls" in f"{error['param']} {error['message']}"
    _assert_ok(two)


def test_queue_over_its_limit_is_429(tight):
    client = _client(tight)
    running = client.completions.create(model=MODEL, prompt="a", max_tokens=HUGE_CONTEXT // 2,
                                        stream=True)  # fmt: skip
    next(iter(running))  # the only slot is taken
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_post, f"{tight}/v1/completions", {"prompt": "b", "max_tokens": 2})
        wait_until(lambda: _replica_stats("tight", 0).num_waiting == 1, "a waiting request")
        rejected = _post(f"{tight}/v1/completions", {"prompt": "c"})
        running.close()
        assert waiting.result().json()["choices"][0]["text"] == expected_text(1, 2)
    assert rejected.status_code == 429
    assert rejected.json()["error"]["code"] == "queue_full"
    _assert_ok(tight)


# ---- disconnects, health, metrics, page ---------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_blocks(two):
    body = {"prompt": "abc", "max_tokens": HUGE_CONTEXT // 2, "stream": True}
    with _post(f"{two}/v1/completions", body, stream=True) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith(b"data: ")
    for index in range(2):
        wait_until(lambda i=index: _replica_stats("two", i).num_running == 0, "the abort")
        assert _replica_stats("two", index).kv_cache_usage == 0.0


def test_metrics_parse_and_move(two):
    def scrape() -> dict[str, float]:
        text = requests.get(f"{two}/metrics", timeout=TIMEOUT_S).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name + str(sorted(sample.labels.items()))
                samples[key] = sample.value
        return samples

    generated = "fleetlm:generation_tokens_total" + str([("model_name", MODEL)])
    before = scrape()
    _client(two).completions.create(model=MODEL, prompt="abc", max_tokens=3)
    after = scrape()
    assert after[generated] - before[generated] == 3
    assert any(key.startswith("fleetlm:time_to_first_token_seconds_count") for key in after)


def test_index_page_is_served(two):
    reply = requests.get(f"{two}/", timeout=TIMEOUT_S)
    assert reply.status_code == 200 and "text/html" in reply.headers["content-type"]


@pytest.fixture
def doomed(http_port):
    """A one-replica app of this test's own: crashing its engine leaves no other test without
    one."""
    from ray import serve

    _deploy("doomed", small_config(migration={"max_migrations": 0}))
    yield f"http://127.0.0.1:{http_port}/doomed"
    serve.delete("doomed")


def test_health_turns_503_when_the_engine_dies(doomed):
    assert requests.get(f"{doomed}/health", timeout=TIMEOUT_S).status_code == 200
    crashed = _post(f"{doomed}/v1/completions", {"prompt": CRASH_MARKER})
    assert crashed.status_code == 503
    health = requests.get(f"{doomed}/health", timeout=TIMEOUT_S)
    assert health.status_code == 503
    assert health.json()["error"]["code"] == "engine_dead"


# ---- replicas failing mid-stream ----------------------------------------------------------


def _wait_healthy(base_url: str) -> None:
    """Replicas killed by an earlier test have been replaced."""
    wait_until(lambda: requests.get(f"{base_url}/health", timeout=TIMEOUT_S).status_code == 200,
                "every replica to be healthy")  # fmt: skip


def _sse_events(base_url: str, body: dict) -> list:
    """Every event of a raw SSE stream, [DONE] as the string."""
    with requests.post(f"{base_url}/v1/completions", json=body, stream=True,
                       timeout=TIMEOUT_S) as reply:  # fmt: skip
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    payloads = [line.decode().removeprefix("data: ") for line in lines]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def test_a_stream_whose_engine_dies_goes_on_on_the_other_replica(moving):
    _wait_healthy(moving)
    prompt = DIE_MARKER + " go on"
    stream = _client(moving).completions.create(
        model=MODEL, prompt=prompt, max_tokens=3 * DIE_AFTER_TOKENS, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == (
        expected_text(len(prompt), 3 * DIE_AFTER_TOKENS))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 3 * DIE_AFTER_TOKENS
    assert len({c.id for c in chunks}) == 1


def test_a_whole_response_is_retried_on_the_other_replica(moving, tmp_path):
    _wait_healthy(moving)
    prompt = f"{DIE_ONCE_MARKER}{tmp_path / 'died'} "
    reply = _client(moving).completions.create(model=MODEL, prompt=prompt,
                                               max_tokens=3 * DIE_AFTER_TOKENS)  # fmt: skip
    assert (tmp_path / "died").exists()  # the first replica did die
    assert reply.choices[0].text == expected_text(len(prompt), 3 * DIE_AFTER_TOKENS)
    assert reply.usage.completion_tokens == 3 * DIE_AFTER_TOKENS


def test_a_lone_replicas_stream_waits_for_its_replacement(lonely):
    _wait_healthy(lonely)
    prompt = DIE_MARKER + " wait"
    stream = _client(lonely, key="unused").completions.create(
        model=MODEL, prompt=prompt, max_tokens=3 * DIE_AFTER_TOKENS, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream)
    assert text == expected_text(len(prompt), 3 * DIE_AFTER_TOKENS)


def test_without_migration_a_dying_stream_ends_with_an_error_event(stranded):
    _wait_healthy(stranded)
    prompt = DIE_MARKER + " stop"
    events = _sse_events(stranded, {"prompt": prompt, "max_tokens": 50, "stream": True})
    *chunks, error, done = events
    assert done == "[DONE]"
    assert set(error["error"]) == ERROR_FIELDS and error["error"]["code"] == "engine_dead"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == expected_text(len(prompt), len(text)) and len(text) <= DIE_AFTER_TOKENS


def _get_right_after_killing_a_replica(app: str, base_url: str, path: str
                                       ) -> tuple[requests.Response, float, list[str]]:
    """GET `path` at once after SIGKILLing the app's first replica (by sorted id): (reply,
    seconds taken, the replica ids before, the killed one first)."""
    _wait_healthy(base_url)
    ids = replicas.replica_ids(app)
    actors.kill(actors.replica_actor(app, replica=ids[0]))
    start = time.monotonic()
    reply = requests.get(f"{base_url}{path}", timeout=TIMEOUT_S)
    return reply, time.monotonic() - start, ids


def test_health_is_503_at_once_while_a_replica_is_dead(stranded):
    health, seconds, _ = _get_right_after_killing_a_replica("stranded", stranded, "/health")
    # The ingress gives a replica's probe HEALTH_PROBE_TIMEOUT_S; the rest is HTTP.
    assert health.status_code == 503 and seconds < HEALTH_PROBE_TIMEOUT_S + 1
    _wait_healthy(stranded)  # Serve replaced it
    _assert_ok_without_key(stranded)


def test_metrics_leave_out_a_dead_replica_and_say_so(moving):
    reply, seconds, (dead, alive) = _get_right_after_killing_a_replica("moving", moving,
                                                                       "/metrics")
    assert reply.status_code == 200 and seconds < METRICS_TIMEOUT_S + 1
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    up = {s.labels["replica"]: s.value for s in families["fleetlm:replica_up"].samples}
    assert up == {f"LLMServer#{dead}": 0.0, f"LLMServer#{alive}": 1.0}
    running = families["fleetlm:num_requests_running"].samples
    assert [s.labels["replica"] for s in running] == [f"LLMServer#{alive}"]
    _wait_healthy(moving)  # Serve replaced it


def _assert_ok_without_key(base_url: str) -> None:
    reply = _client(base_url, key="unused").completions.create(model=MODEL, prompt="ok",
                                                               max_tokens=2)  # fmt: skip
    assert reply.choices[0].text == expected_text(2, 2)
