"""P/D between engines split differently: a prefill engine at TP=1 and a decode engine on a
worker group at TP=3 (the built-in model's 3 KV heads re-split: each decode rank pulls its
head from the one prefill rank), and back (TP=3 prefill: each rank's head from its own
server -> TP=1 decode). Real Ray worker actors (a quarter CPU, one torch thread each, gloo).
Greedy tokens equal one colocated engine's; a stalled transfer on the group (every rank
fails, each in its own time) is recomputed once; after every test both sides' blocks are
free and no lease, load or half-reported transfer is left on any rank."""

from __future__ import annotations

import pytest
from pd_helpers import (
    ENGINE,
    MAX_TOKENS,
    black_hole,
    engine,
    generate,
    prefill,
    prompt_for,
    redirected,
    release,
    settle,
)

from fleetlm import LLM

WORKER_CPUS = 0.25


@pytest.fixture(scope="module")
def engines(ray_cluster):
    llms = {"reference": engine(), "tp1": engine(role="both", transport="tcp")}
    llms["tp3"] = LLM(**ENGINE, tensor_parallel_size=3, worker_num_cpus=WORKER_CPUS,
                      kv_transfer_config={"role": "both", "transport": "tcp",
                                          "transfer_timeout_s": 2.0})
    yield llms
    for llm in llms.values():
        llm.shutdown()


@pytest.fixture(autouse=True)
def settled(engines):
    yield
    for llm in engines.values():
        settle(llm)


def reference(engines, prompt: list[int]) -> list[int]:
    return generate(engines["reference"], prompt).outputs[0].token_ids


@pytest.mark.parametrize(("source", "target", "kind", "salt"), [
    ("tp1", "tp3", "short", 101), ("tp1", "tp3", "longer_than_a_chunk", 102),
    ("tp3", "tp1", "longer_than_a_chunk", 103),
])
def test_kv_heads_are_resplit_between_tensor_parallel_sizes(engines, source, target, kind,
                                                            salt):
    prompt = prompt_for(kind, salt)
    params = prefill(engines[source], prompt)
    heads = [rank["heads"] for rank in params["ranks"]]
    assert heads == ([[0, 3]] if source == "tp1" else [[0, 1], [1, 2], [2, 3]])
    out = generate(engines[target], prompt, kv_transfer_params=params)
    assert out.outputs[0].token_ids == reference(engines, prompt)
    assert out.num_cached_tokens == len(prompt) - 1  # all but the last token were loaded


def test_a_stalled_transfer_on_a_worker_group_is_recomputed_once(engines):
    decode, prompt = engines["tp3"], prompt_for("short", 104)
    params = prefill(engines["tp1"], prompt)
    scheduler = decode.engine.core.scheduler
    with black_hole() as hole:
        steps_before = scheduler.num_steps
        out = generate(decode, prompt, kv_transfer_params=redirected(
            params, f"tcp://127.0.0.1:{hole.getsockname()[1]}"))
    assert out.outputs[0].token_ids == reference(engines, prompt)
    assert out.num_cached_tokens == 0
    # Admit, wait (blocked) for the ranks' timeouts, collect, prompt, decode: the engine
    # neither spun while the ranks waited nor ran the request twice.
    assert scheduler.num_steps - steps_before <= 4 + MAX_TOKENS
    release(params)
