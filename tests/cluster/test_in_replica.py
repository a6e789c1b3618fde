"""`http.ingress: in_replica`: the engine replica serves the OpenAI routes itself.

A real Serve application (the fake engine in its replica) over HTTP: the same answers,
errors, aborts, health and metrics as with a separate ingress, from one deployment; and what
it gives up, migration: a stream whose engine dies ends with an error event at once, and
Serve replaces the replica, routes and engine together.
"""

from __future__ import annotations

import json
import time

import openai
import pytest
import replicas
import requests
from conftest import small_config, wait_until
from fake_engine import CRASH_MARKER, DIE_AFTER_TOKENS, DIE_MARKER, FakeEngine, expected_text
from prometheus_client.parser import text_string_to_metric_families

from fleetlm.cluster.app import build_app
from fleetlm.cluster.ingress import REPLICA_HEADER

pytestmark = pytest.mark.slow  # a Serve application on the session's Ray cluster
APP = "inreplica"
MODEL = "smollm2-135m-instruct"
API_KEY = "sk-in-replica"
HUGE_CONTEXT = 1_000_000  # lets a fake request run for minutes unless it is aborted
TIMEOUT_S = 60.0
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def app(http_port):
    from ray import serve

    config = small_config(http={"ingress": "in_replica", "api_keys": [API_KEY]},
                          model={"max_model_len": HUGE_CONTEXT},
                          migration={"timeout_s": TIMEOUT_S})  # fmt: skip
    serve.run(build_app(config, FakeEngine), name=APP, route_prefix=f"/{APP}")
    yield f"http://127.0.0.1:{http_port}/{APP}"
    serve.delete(APP)


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, timeout=TIMEOUT_S)


def _post(url: str, body, **kwargs) -> requests.Response:
    return requests.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                         timeout=TIMEOUT_S, **kwargs)  # fmt: skip


def _wait_healthy(base_url: str) -> str:
    """Wait until the replica (a replacement, after a test killed its engine) serves; its id."""
    wait_until(lambda: requests.get(f"{base_url}/health", timeout=TIMEOUT_S).status_code == 200,
                "the replica to be healthy")  # fmt: skip
    (replica,) = replicas.replica_ids(APP, count=1)
    return replica


def test_one_deployment_serves_the_routes_and_the_engine(app):
    from ray import serve

    replica = _wait_healthy(app)
    assert set(serve.status().applications[APP].deployments) == {"LLMServer"}
    reply = _post(f"{app}/v1/completions", {"prompt": "abc", "max_tokens": 4})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["text"] == expected_text(3, 4)
    assert reply.headers[REPLICA_HEADER] == replica
    chat = _client(app).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.content == expected_text(len("<user>hi\n<assistant>"), 5)
    assert [m.id for m in _client(app).models.list().data] == [MODEL]
    health = requests.get(f"{app}/health", timeout=TIMEOUT_S)
    assert health.json() == {"status": "ok", "num_replicas": 1}
    page = requests.get(f"{app}/", timeout=TIMEOUT_S)  # the web chat page
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_a_stream_arrives_whole(app):
    _wait_healthy(app)
    stream = _client(app).completions.create(model=MODEL, prompt="abcd", max_tokens=12,
                                             stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(4, 12)
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("body, key, status", [
    ({"prompt": "a", "max_tokens": -1}, API_KEY, 400),
    ({"prompt": "a", "model": "other"}, API_KEY, 404),
    ({"prompt": "a"}, "sk-wrong", 401),
])
def test_errors_have_openai_shape_and_the_replica_keeps_serving(app, body, key, status):
    _wait_healthy(app)
    reply = requests.post(f"{app}/v1/completions", json=body, timeout=TIMEOUT_S,
                          headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    assert reply.status_code == status
    assert set(reply.json()["error"]) == ERROR_FIELDS
    assert _post(f"{app}/v1/completions", {"prompt": "ok", "max_tokens": 2}).json()[
        "choices"][0]["text"] == expected_text(2, 2)


def test_disconnect_mid_stream_aborts_and_frees_blocks(app):
    replica = _wait_healthy(app)
    body = {"prompt": "abc", "max_tokens": HUGE_CONTEXT // 2, "stream": True}
    with _post(f"{app}/v1/completions", body, stream=True) as reply:
        lines = reply.iter_lines()  # dropping the iterator would close the connection
        assert next(lines).startswith(b"data: ")
        wait_until(lambda: replicas.ask(APP, replica, "stats").num_running == 1, "the stream")
    wait_until(lambda: replicas.ask(APP, replica, "stats").num_running == 0, "the abort")
    assert replicas.ask(APP, replica, "stats").kv_cache_usage == 0.0


def test_metrics_name_the_replica_and_move(app):
    replica = _wait_healthy(app)

    def scrape() -> dict:
        text = requests.get(f"{app}/metrics", timeout=TIMEOUT_S).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def generated(families) -> float:
        return sum(s.value for s in families["fleetlm:generation_tokens"].samples
                   if s.name == "fleetlm:generation_tokens_total")

    before = scrape()
    _post(f"{app}/v1/completions", {"prompt": "abc", "max_tokens": 3})
    after = scrape()
    assert generated(after) - generated(before) == 3
    up = {s.labels["replica"]: s.value for s in after["fleetlm:replica_up"].samples}
    assert up == {f"LLMServer#{replica}": 1.0}


def test_a_stream_whose_engine_dies_ends_with_an_error_and_the_replica_is_replaced(app):
    before = _wait_healthy(app)
    started = time.monotonic()
    prompt = DIE_MARKER + " stop"
    with _post(f"{app}/v1/completions", {"prompt": prompt, "max_tokens": 50, "stream": True},
               stream=True) as reply:  # fmt: skip
        lines = [line.decode().removeprefix("data: ") for line in reply.iter_lines() if line]
    *chunks, error, done = [p if p == "[DONE]" else json.loads(p) for p in lines]
    # No other replica to move to, and no waiting for the replacement (migration.timeout_s).
    assert time.monotonic() - started < TIMEOUT_S / 2
    assert done == "[DONE]" and error["error"]["code"] == "engine_dead"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == expected_text(len(prompt), len(text)) and len(text) <= DIE_AFTER_TOKENS
    after = _wait_healthy(app)  # Serve's health check found the dead engine and replaced it
    assert after != before
    reply = _post(f"{app}/v1/completions", {"prompt": "ok", "max_tokens": 2})
    assert reply.json()["choices"][0]["text"] == expected_text(2, 2)


def test_health_turns_503_when_the_engine_dies(app):
    _wait_healthy(app)
    crashed = _post(f"{app}/v1/completions", {"prompt": CRASH_MARKER})
    assert crashed.status_code == 503 and crashed.json()["error"]["code"] == "engine_dead"
    health = requests.get(f"{app}/health", timeout=TIMEOUT_S)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    _wait_healthy(app)
