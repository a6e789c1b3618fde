"""Tensor-parallel engine replicas behind Ray Serve, over HTTP with the OpenAI SDK.

Served: TP=3 replicas answer with the single-process engine's greedy text. Killed: under 8
concurrent greedy streams, one worker actor of a TP=3 replica (and, separately, the replica's
own process) is SIGKILLed (the built-in model's 9 heads rule TP=2 out); /health turns 503 at
once, every stream still completes with the text of an undisturbed run (migrated to the other
replica), Serve replaces the replica, and no KV blocks stay in use. With migration off the
streams end with an error event and [DONE].
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import actors
import replicas
import aiohttp
import openai
import pytest
from conftest import small_config

from fleetlm.cluster.app import build_app, deployment_name
from fleetlm.cluster.ingress import HEALTH_PROBE_TIMEOUT_S
from fleetlm.cluster.openai_protocol import CompletionRequest

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ENGINE = {"kv_cache_memory_bytes": 32 << 20, "max_num_seqs": 16, "max_num_batched_tokens": 256}
WORKER_CPUS = 0.1  # two TP=3 replicas and a replacement in 2 CPUs
TP = 3
MAX_MODEL_LEN = 256
NUM_TOKENS = 32
NUM_STREAMS = 8
TIMEOUT_S = 600.0
HEALTH_DEADLINE_S = 1.0
PROMPTS = [f"Here is fact number {i} about the ocean:" for i in range(NUM_STREAMS)]
GREEDY = {"max_tokens": NUM_TOKENS, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
ERROR_FIELDS = {"message", "type", "param", "code"}


def _config(tensor_parallel_size: int, count: int = 1, **sections):
    return small_config(
        model={"dtype": "float32", "max_model_len": MAX_MODEL_LEN},
        engine=ENGINE,
        replicas={"count": count},
        parallel={"tensor_parallel_size": tensor_parallel_size, "worker_num_cpus": WORKER_CPUS},
        **sections,
    )


def _deploy(http_port: int, name: str, config) -> str:
    from ray import serve

    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{http_port}/{name}"


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=TIMEOUT_S)


async def _greedy_texts(base_url: str, prompts: list[str]) -> list[str]:
    async with _client(base_url) as client:
        replies = await asyncio.gather(*(
            client.completions.create(model=MODEL, prompt=p, **GREEDY) for p in prompts))
    return [reply.choices[0].text for reply in replies]


# ---- served -------------------------------------------------------------------------------


def test_tp3_replicas_serve_the_greedy_text_of_one_process(tp3x2, undisturbed):
    """Two TP=3 replicas (the app the kill tests below use) answer with the single-process
    engine's greedy text, each over three workers of its replica's own placement group."""
    from fleetlm import LLM, SamplingParams

    asyncio.run(_wait_healthy(tp3x2))  # after a kill test, both replicas again
    with LLM(MODEL, dtype="float32", max_model_len=MAX_MODEL_LEN, **ENGINE) as offline:
        params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
        expected = [o.outputs[0].text for o in offline.generate(PROMPTS, params)]
    assert undisturbed == expected
    for replica in replicas.replica_ids("tp3x2", count=2):
        assert len(actors.worker_actors(actors.replica_actor("tp3x2", replica=replica))) == 3
    sizes = _live_group_sizes()  # the workers use the replica's group, not one of their own
    assert sizes.count(1 + 3) >= 2 and 3 not in sizes
    logs = _replica_logs("tp3x2", deployment_name())
    assert any("worker group of 3 ready" in log for log in logs)
    assert any(all(f"[rank {rank}] fleetlm.worker: rank {rank}: tp {rank}/3" in log
                   for rank in range(3)) for log in logs)  # fmt: skip


def _live_group_sizes() -> list[int]:
    """The number of bundles of each placement group that holds resources now."""
    from ray.util import placement_group_table

    return [len(group["bundles"]) for group in placement_group_table().values()
            if group["state"] == "CREATED"]  # fmt: skip


def _replica_logs(app: str, deployment: str) -> list[str]:
    """The Serve log files of a deployment's replicas in this session."""
    import ray

    serve_logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return [path.read_text() for path in serve_logs.glob(f"replica_{app}_{deployment}_*.log")]


# ---- killed -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp3x2(http_port):
    """Two TP=3 replicas: a stream whose replica fails moves to the other one at once."""
    from ray import serve

    yield _deploy(http_port, "tp3x2", _config(TP, count=2, migration={"timeout_s": TIMEOUT_S}))
    serve.delete("tp3x2")


@pytest.fixture(scope="module")
def undisturbed(tp3x2) -> list[str]:
    return asyncio.run(_greedy_texts(tp3x2, PROMPTS))


def _http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))


async def _health(http: aiohttp.ClientSession, base_url: str) -> int:
    async with http.get(f"{base_url}/health") as reply:
        return reply.status


async def _wait_healthy(base_url: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    async with _http() as http:
        while await _health(http, base_url) != 200:
            assert time.monotonic() < deadline, "the app did not become healthy"
            await asyncio.sleep(0.2)


class _Streams:
    """NUM_STREAMS greedy streams; `started` is set once every one has received text."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.texts = [""] * NUM_STREAMS
        self.is_finished = [False] * NUM_STREAMS
        self.started = asyncio.Event()

    async def run(self) -> list[str]:
        async with _client(self.base_url) as client:
            await asyncio.gather(*(self._one(client, i) for i in range(NUM_STREAMS)))
        return self.texts

    async def _one(self, client: openai.AsyncOpenAI, index: int) -> None:
        stream = await client.completions.create(model=MODEL, prompt=PROMPTS[index],
                                                 stream=True, **GREEDY)  # fmt: skip
        async for chunk in stream:
            self.texts[index] += chunk.choices[0].text
            self.is_finished[index] = chunk.choices[0].finish_reason is not None
            if all(self.texts):
                self.started.set()


async def _kill_under_streams(base_url: str, victim: dict) -> tuple[list[str], float]:
    """Kill `victim` once all streams are mid-response; their texts, and how long /health
    took to answer 503."""
    streams = _Streams(base_url)
    running = asyncio.ensure_future(streams.run())
    await asyncio.wait_for(streams.started.wait(), TIMEOUT_S)
    assert not any(streams.is_finished)
    async with _http() as http:
        actors.kill(victim)
        killed_at = time.monotonic()
        while await _health(http, base_url) == 200:
            pass
        time_to_503 = time.monotonic() - killed_at
    return await running, time_to_503


def _assert_no_blocks_in_use(app: str, replica: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while (stats := replicas.ask(app, replica, "stats")).num_running or stats.num_waiting:
        assert time.monotonic() < deadline, f"requests still running on replica {replica}"
        time.sleep(0.1)
    assert stats.kv_cache_usage == 0.0


def _assert_replaced(app: str, old: dict, survivor: str) -> None:
    """A new replica process (with its own workers) serves requests sent straight to it."""
    [new_id] = [r for r in replicas.replica_ids(app, count=2) if r != survivor]
    new = actors.replica_actor(app, replica=new_id)
    assert new["ActorID"] != old["ActorID"] and len(actors.worker_actors(new)) == TP
    [reply] = list(replicas.stream(app, new_id, "completions",
                                   CompletionRequest(prompt="Hi", max_tokens=2)))
    assert reply["usage"]["completion_tokens"] == 2
    _assert_no_blocks_in_use(app, new_id)


def _victim_and_survivor(app: str) -> tuple[dict, str]:
    """The actor of one of the app's two replicas, and the other's replica id."""
    victim, survivor = replicas.replica_ids(app, count=2)
    return actors.replica_actor(app, replica=victim), survivor


def test_killing_a_worker_migrates_every_stream(tp3x2, undisturbed):
    asyncio.run(_wait_healthy(tp3x2))
    replica, survivor = _victim_and_survivor("tp3x2")
    victim, *_ = actors.worker_actors(replica)
    texts, time_to_503 = asyncio.run(_kill_under_streams(tp3x2, victim))
    assert time_to_503 < HEALTH_DEADLINE_S
    assert texts == undisturbed
    _assert_no_blocks_in_use("tp3x2", survivor)
    asyncio.run(_wait_healthy(tp3x2))
    _assert_replaced("tp3x2", replica, survivor)


def test_killing_the_replica_process_migrates_every_stream(tp3x2, undisturbed):
    asyncio.run(_wait_healthy(tp3x2))
    replica, survivor = _victim_and_survivor("tp3x2")
    texts, time_to_503 = asyncio.run(_kill_under_streams(tp3x2, replica))
    assert time_to_503 < HEALTH_PROBE_TIMEOUT_S + 1  # a dead replica: the probe times out
    assert texts == undisturbed
    _assert_no_blocks_in_use("tp3x2", survivor)
    asyncio.run(_wait_healthy(tp3x2))
    _assert_replaced("tp3x2", replica, survivor)


@pytest.mark.release  # CI: tests/cluster/test_app.py checks the error event on a fake engine
def test_without_migration_killed_streams_end_with_an_error_event(http_port):
    from ray import serve

    base_url = _deploy(http_port, "stranded", _config(TP, migration={"max_migrations": 0}))
    try:
        replica = actors.replica_actor("stranded")
        events = asyncio.run(_raw_streams_killed(base_url, actors.worker_actors(replica)[0]))
    finally:
        serve.delete("stranded")
    for stream in events:
        *chunks, error, done = stream
        assert chunks and done == "[DONE]"
        assert set(error["error"]) == ERROR_FIELDS and error["error"]["code"] == "engine_dead"


async def _raw_streams_killed(base_url: str, victim: dict) -> list[list]:
    """Every event of NUM_STREAMS raw SSE streams, `victim` killed once all have text."""
    started = [asyncio.Event() for _ in range(NUM_STREAMS)]

    async def one(http: aiohttp.ClientSession, index: int) -> list:
        body = {"prompt": PROMPTS[index], "stream": True, "max_tokens": NUM_TOKENS,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        events = []
        async with http.post(f"{base_url}/v1/completions", json=body) as reply:
            async for raw in reply.content:
                if line := raw.decode().strip():
                    payload = line.removeprefix("data: ")
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                    started[index].set()
        return events

    async with _http() as http:
        running = asyncio.gather(*(one(http, i) for i in range(NUM_STREAMS)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), TIMEOUT_S)
        actors.kill(victim)
        return await running
