"""Prefix-aware routing on a real two-replica deployment of the built-in model (one thread
each): the ingress hashes each prompt as the engines do and, with `precise_prefix`, mirrors
the replicas' prefix caches from their KV events; requests of one tenant (a long shared
system prompt) then land on the replica that holds it, as the replicas' own prefix-cache
counters show, and each response names it (the `x-fleetlm-replica` header)."""

from __future__ import annotations

import openai
import pytest
import replicas
from conftest import small_config

from fleetlm.cluster.app import build_app
from fleetlm.cluster.router import RoutingRequest, build_router


ENGINE = {"kv_cache_memory_bytes": 32 << 20, "max_num_seqs": 8}
TENANTS = {
    "astronomy": "You are the help desk of an observatory. Answer questions about telescopes, "
                 "opening hours, guided night tours, the planetarium shows and the cafe. " * 3,
    "bakery": "You are the assistant of a bakery. You know the breads, the cakes, the "
              "allergens in each of them, the prices and when the shop opens on holidays. " * 3,
}
QUESTIONS = ["When do you open?", "What do you recommend?", "Is there parking?",
             "Can I bring a dog?"]
# An order that alternating (round-robin) routing splits: it sends the first two to both.
ORDER = ["astronomy", "astronomy", "bakery", "astronomy", "bakery", "bakery", "astronomy",
         "bakery"]


def _stats(app: str) -> list:
    """Each replica's engine statistics, in the order of their ids."""
    by_replica = replicas.stats(app)
    return [by_replica[r] for r in sorted(by_replica)]


def test_round_robin_splits_a_tenant_of_this_order():
    """The control: routing that ignores prefixes sends one tenant's requests of ORDER to
    both replicas, so the test below shows what the prefix policy does."""
    router = build_router("round_robin", ["r0", "r1"])
    landed: dict[str, set[str]] = {tenant: set() for tenant in TENANTS}
    for i, tenant in enumerate(ORDER):
        landed[tenant].add(router.pick(RoutingRequest(f"req-{i}")).name)
    assert all(len(names) == 2 for names in landed.values()), landed


# approx_prefix runs the same filter and scorer from the router's own history: test_router.py
@pytest.mark.slow
def test_a_tenants_requests_stick_to_the_replica_holding_its_prefix(http_port):
    from ray import serve

    app = "prefix-precise"
    config = small_config(replicas={"count": 2}, engine=ENGINE,
                          model={"max_model_len": 512}, router={"policy": "precise_prefix"})
    serve.run(build_app(config), name=app, route_prefix=f"/{app}")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/{app}/v1",
                               api_key="unused", timeout=300)
        landed: dict[str, set[int]] = {tenant: set() for tenant in TENANTS}
        names = replicas.replica_ids(app)
        for i, tenant in enumerate(ORDER):
            before = [s.num_prompt_tokens for s in _stats(app)]
            response = client.chat.completions.with_raw_response.create(
                model=config.model.served_name, max_tokens=2, temperature=0,
                stream=i % 2 == 1,  # a stream's first chunk brings the replica's KV events
                messages=[{"role": "system", "content": TENANTS[tenant]},
                          {"role": "user", "content": QUESTIONS[i // 2]}])
            if i % 2 == 1:
                assert any(chunk.choices for chunk in response.parse())
            after = [s.num_prompt_tokens for s in _stats(app)]
            [served] = [i for i in range(2) if after[i] > before[i]]
            assert response.headers["x-fleetlm-replica"] == names[served]
            landed[tenant].add(served)
        hits = sum(s.prefix_cache_hits for s in _stats(app))
        num_repeats = len(ORDER) - len(TENANTS)  # requests after each tenant's first
        assert all(len(replicas) == 1 for replicas in landed.values()), landed
        streamed = client.chat.completions.with_raw_response.create(
            model=config.model.served_name, max_tokens=2, temperature=0, stream=True,
            messages=[{"role": "system", "content": TENANTS["bakery"]},
                      {"role": "user", "content": QUESTIONS[0]}])
        assert streamed.headers["x-fleetlm-replica"] == names[min(landed["bakery"])]
        assert any(chunk.choices for chunk in streamed.parse())
        # Every request after a tenant's first hit its system prompt (~60 tokens) there.
        assert hits >= num_repeats * 48
    finally:
        serve.delete(app)
