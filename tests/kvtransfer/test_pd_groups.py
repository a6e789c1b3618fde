"""P/D between engines split differently: a prefill engine at TP=1 and a decode engine on a
worker group at TP=3 (the built-in model's 3 KV heads re-split: each decode rank pulls its
head from the one prefill rank, over a two-rank gloo group of its own: the dist transport),
and back (each prefill rank's head from its own TCP server -> TP=1 decode); as a release check also TP=3 x PP=2 (30 layers split in two stages too). Real Ray worker actors (a quarter CPU, one torch thread each, gloo).
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
)

from fleetlm import LLM

WORKER_CPUS = 0.25


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.release)],
                ids=["tp3", "tp3xpp2"])
def engines(ray_cluster, request):
    llms = {"reference": engine(), "tp1": engine(role="both", transport="dist")}
    llms["tp3"] = LLM(**ENGINE, tensor_parallel_size=3, pipeline_parallel_size=request.param,
                      worker_num_cpus=WORKER_CPUS,
                      kv_transfer_config={"role": "both", "transport": "tcp",
                                          "transfer_timeout_s": 2.0})
    yield llms
    for llm in llms.values():
        llm.shutdown()


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
    parts = [(rank["layers"], rank["heads"]) for rank in params["ranks"]]
    num_stages = engines["tp3"].engine.executor.layout.pipeline_parallel_size
    stages = [[0, 30]] if num_stages == 1 else [[0, 15], [15, 30]]
    assert parts == ([([0, 30], [0, 3])] if source == "tp1" else
                     [(layers, [head, head + 1]) for layers in stages for head in range(3)])
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
    # Admit, wait (blocked) for the ranks' timeouts, collect, prompt, decode (with two
    # pipeline stages up to two schedules a step): the engine neither spun while the ranks
    # waited nor ran the request twice.
    num_stages = decode.engine.executor.layout.pipeline_parallel_size
    assert scheduler.num_steps - steps_before <= (4 + MAX_TOKENS) * num_stages
    release(params)


def test_one_ranks_part_failing_fails_the_load_once(engines):
    """The group reads from itself (TP=3 -> TP=3), but rank 1's source never answers: ranks
    0 and 2 finish, rank 1 times out later; the load fails once and is recomputed."""
    group, prompt = engines["tp3"], prompt_for("short", 105)
    params = prefill(group, prompt)
    stalled_rank = params["ranks"][1]
    with black_hole() as hole:
        ranks = [*params["ranks"]]
        ranks[1] = {**stalled_rank, "address": f"tcp://127.0.0.1:{hole.getsockname()[1]}"}
        out = generate(group, prompt, kv_transfer_params={**params, "ranks": ranks})
    assert out.outputs[0].token_ids == reference(engines, prompt)
    assert out.num_cached_tokens == 0
    release({**params, "ranks": [stalled_rank]})
