"""A decode replica's side of P/D, in-process over the real engine (no Ray): the decider, and
the failure policy when the prefill pool or the KV read fails.

The prefill pool here is a stand-in for Serve's handle whose `prefill` answers what a test
needs: an exception (a dead or failing prefill replica), or the transfer params of a real
prefill replica that stopped right after it answered (killed after computing the prompt).
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import small_config

from fleetlm.cluster.config import ClusterConfig, PDSection, pool_config, to_engine_config
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.openai_protocol import CompletionRequest
from fleetlm.cluster.pd import RemotePrefill
from fleetlm.cluster.server import LLMServer

ENGINE = {"kv_cache_memory_bytes": 16 << 20, "max_num_seqs": 4}
MAX_MODEL_LEN = 256
THRESHOLD = 16
PROMPT = list(range(1000, 1040))  # 40 tokens: above the threshold, so it goes to "prefill"
NUM_TOKENS = 6


class _Response:
    def __init__(self, coroutine) -> None:
        self._task = asyncio.ensure_future(coroutine)

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()


class _PrefillPool:
    """What `RemotePrefill` uses of a Serve handle to a prefill replica."""

    app_name, deployment_name = "pd-policy", "prefill-stand-in"

    def __init__(self, answer) -> None:
        self.answer = answer  # async (token_ids, request_id) -> params
        self.num_calls = 0
        self.prefill = self

    def options(self, **_) -> _PrefillPool:
        return self

    def remote(self, token_ids: list[int], request_id: str, routing=None) -> _Response:
        self.num_calls += 1
        return _Response(self.answer(token_ids, request_id))


def _config(policy: str) -> ClusterConfig:
    data = small_config(engine=ENGINE, model={"max_model_len": MAX_MODEL_LEN}).model_dump()
    data["pd"] = {"threshold_tokens": THRESHOLD, "prefill_timeout_s": 30.0}
    data["kv_transfer"] = {"failure_policy": policy, "transfer_timeout_s": 10.0}
    return ClusterConfig.model_validate(data)


def _decode_server(policy: str, answer) -> tuple[LLMServer, _PrefillPool]:
    config = _config(policy)
    pool = _PrefillPool(answer)
    server = LLMServer(to_engine_config(pool_config(config, "decode")), "m",
                       prefill_server=pool, pd=config.pd)
    return server, pool


async def _params_of_a_gone_prefill_engine(token_ids: list[int]) -> dict:
    """A real prefill replica computes the prompt, answers its transfer params, and stops
    (its KV server with it), as when it is killed before the decode side reads."""
    producer = LLMServer(to_engine_config(pool_config(_config("recompute"), "prefill")), "m")
    try:
        return await producer.prefill(token_ids, "gone")
    finally:
        await producer.shutdown()


async def _complete(server: LLMServer, prompt: list[int]) -> object:
    request = CompletionRequest(prompt=prompt, max_tokens=NUM_TOKENS, temperature=0)
    items = [item async for item in server.completions(request)]
    assert len(items) == 1
    return items[0]


async def _raise(token_ids, request_id):
    raise RuntimeError("the prefill replica died")


async def _refuse(token_ids, request_id):
    raise ValueError("prompt token ids must be in [0, 49152)")


@pytest.fixture(scope="module")
def expected() -> str:
    """The text without any P/D: the threshold keeps the prompt on the decode replica."""

    async def run():
        server, pool = _decode_server("recompute", _raise)
        server.remote_prefill.threshold_tokens = len(PROMPT) + 1
        try:
            body = await _complete(server, PROMPT)
        finally:
            await server.shutdown()
        assert pool.num_calls == 0
        return body["choices"][0]["text"]

    return asyncio.run(run())


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_failed_prefill_call_recomputes_or_answers_503(policy, expected):
    async def run():
        server, pool = _decode_server(policy, _raise)
        try:
            return await _complete(server, PROMPT), pool.num_calls, server.stats()
        finally:
            await server.shutdown()

    answer, num_calls, stats = asyncio.run(run())
    assert num_calls == 1
    if policy == "recompute":
        assert answer["choices"][0]["text"] == expected
    else:
        assert isinstance(answer, OpenAIError)
        assert (answer.status, answer.code, answer.type) == (503, "kv_transfer_failed",
                                                             "server_error")
    assert stats.kv_cache_usage == 0


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_kv_of_a_gone_prefill_engine_recomputes_or_answers_503(policy, expected):
    async def run():
        server, _ = _decode_server(policy, lambda ids, rid: _params_of_a_gone_prefill_engine(ids))
        try:
            answer = await _complete(server, PROMPT)
            snapshot = server.metrics_snapshot()
            server.engine.engine.core.scheduler.check_invariants()
            return answer, snapshot
        finally:
            await server.shutdown()

    answer, snapshot = asyncio.run(run())
    assert snapshot["kv_transfer_failures"] == {"unreachable": 1}
    assert snapshot["pd"]["num_remote"] == 1
    assert snapshot["gauges"]["kv_cache_usage_perc"] == 0
    if policy == "recompute":
        assert answer["choices"][0]["text"] == expected
    else:
        assert (answer.status, answer.code) == (503, "kv_transfer_failed")
        assert "unreachable" in answer.message


def test_a_prompt_the_prefill_replica_refuses_is_left_to_the_decode_engine(expected):
    """Not a failure of the prefill pool: the decode replica's engine judges the prompt
    (here it is valid, so even under "fail" it is answered, and no failure is counted)."""

    async def run():
        server, pool = _decode_server("fail", _refuse)
        try:
            return await _complete(server, PROMPT), pool.num_calls, server.metrics_snapshot()
        finally:
            await server.shutdown()

    answer, num_calls, snapshot = asyncio.run(run())
    assert num_calls == 1 and answer["choices"][0]["text"] == expected
    assert snapshot["pd"]["failures_by_cause"] == {}


def test_the_decider_counts_uncached_tokens():
    prefill = RemotePrefill(_PrefillPool(_raise), PDSection(threshold_tokens=THRESHOLD))
    assert not prefill.is_worth_it(THRESHOLD - 1, 0)  # short
    assert prefill.is_worth_it(THRESHOLD, 0)
    assert not prefill.is_worth_it(THRESHOLD + 32, 33)  # mostly cached here
    assert prefill.is_worth_it(THRESHOLD + 32, 32)
    assert prefill.snapshot() == {"num_remote": 2, "num_local": 2, "failures_by_cause": {}}
    everything = RemotePrefill(_PrefillPool(_raise), PDSection(threshold_tokens=0))
    assert everything.is_worth_it(2, 0) and not everything.is_worth_it(1, 0)
