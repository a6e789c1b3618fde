"""Autoscaling on what the replicas report: the policy's arithmetic, and a real Serve
deployment (fake engines) that gains a replica while load is high and loses it when load
falls, with every request answered meanwhile."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import replicas
import requests
from conftest import small_config
from fake_engine import FakeEngine, expected_text
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from fleetlm.cluster.app import build_app
from fleetlm.cluster.autoscaling import KV_USAGE, QueueAndKVPolicy
from fleetlm.cluster.config import ClusterConfig

HUGE = 1_000_000  # a fake request that runs until its client goes away
TIMEOUT_S = 120.0


def _context(num_replicas: int, num_requests: float, usage: list[float]) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name="LLMServer", app_name="a",
        current_num_replicas=num_replicas, target_num_replicas=num_replicas,
        running_replicas=[], total_num_requests=num_requests, total_queued_requests=0,
        aggregated_metrics={KV_USAGE: {f"r{i}": u for i, u in enumerate(usage)}},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=4))


def test_the_policy_wants_replicas_for_requests_or_kv_usage_whichever_is_more():
    policy = QueueAndKVPolicy(target_kv_usage=0.5)
    assert policy(_context(2, 12, [0.1, 0.1]))[0] == 3  # 12 requests / 4 per replica
    assert policy(_context(2, 2, [0.9, 0.7]))[0] == pytest.approx(3.2)  # 2 * 0.8 / 0.5
    assert policy(_context(2, 0, [0.0, 0.0]))[0] == 0  # Serve keeps min_replicas
    assert policy(_context(0, 5, []))[0] == 0  # none running: Serve's cold start decides


def test_the_config_refuses_count_next_to_autoscaling_and_inverted_bounds():
    with pytest.raises(ValueError, match="leave count out"):
        ClusterConfig.model_validate({"replicas": {"count": 2, "autoscaling": {}}})
    with pytest.raises(ValueError, match="below min_replicas"):
        ClusterConfig.model_validate(
            {"replicas": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


@pytest.mark.slow
def test_load_adds_a_replica_and_its_end_removes_it_without_losing_requests(http_port):
    from ray import serve

    app = "elastic"
    config = small_config(model={"max_model_len": HUGE}, replicas={"autoscaling": {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
        "upscale_delay_s": 0.5, "downscale_delay_s": 2.0, "metrics_interval_s": 0.5,
        "look_back_period_s": 1.0}})
    serve.run(build_app(config, FakeEngine), name=app, route_prefix=f"/{app}")
    url = f"http://127.0.0.1:{http_port}/{app}/v1/completions"
    answers: list[str] = []
    done = threading.Event()

    def short_requests() -> None:  # all the while: each must be answered, and right
        while not done.is_set():
            reply = requests.post(url, json={"prompt": "ok", "max_tokens": 2},
                                  timeout=TIMEOUT_S)
            answers.append(reply.json()["choices"][0]["text"] if reply.ok else reply.text)

    def long_stream(stop: threading.Event) -> None:
        body = {"prompt": "a", "max_tokens": HUGE // 2, "stream": True}
        with requests.post(url, json=body, stream=True, timeout=TIMEOUT_S) as reply:
            for _ in reply.iter_lines():
                if stop.is_set():
                    return

    try:
        assert replicas.replica_ids(app) and len(replicas.replica_ids(app)) == 1
        stop = threading.Event()
        with ThreadPoolExecutor(7) as pool:
            checker = pool.submit(short_requests)
            streams = [pool.submit(long_stream, stop) for _ in range(6)]
            started = time.monotonic()
            replicas.replica_ids(app, count=2)  # waits for the second replica
            scaled_up_s = time.monotonic() - started
            stop.set()
            for stream in streams:
                stream.result(timeout=TIMEOUT_S)
            started = time.monotonic()
            replicas.replica_ids(app, count=1)  # waits for one to go
            scaled_down_s = time.monotonic() - started
            done.set()
            checker.result(timeout=TIMEOUT_S)
        print(f"scaled up after {scaled_up_s:.1f} s of load, down {scaled_down_s:.1f} s after it")
        assert answers and all(a == expected_text(2, 2) for a in answers), set(answers)
    finally:
        done.set()
        serve.delete(app)
