"""Shared by the P/D engine tests: engine settings, prompts, driving one request, and the
check that both sides are settled after a test."""

from __future__ import annotations

import random
import socket

from fleetlm import LLM
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.kvtransfer.transport import connect

ENGINE = {"dtype": "float32", "device": "cpu", "block_size": 8, "num_blocks": 32,
          "max_num_batched_tokens": 16, "max_num_seqs": 4}
MAX_TOKENS = 3
DO_REMOTE_DECODE = {"do_remote_decode": True}


def tokens(count: int, salt: int) -> list[int]:
    rng = random.Random(salt)
    return [rng.randrange(1000, 40000) for _ in range(count)]


PREFIX_LENGTH = 16
LENGTHS = {"short": 5, "block_multiple": 16, "longer_than_a_chunk": 24, "cached_prefix": 28}


def prompt_for(kind: str, salt: int) -> list[int]:
    """A prompt no other test uses: "longer_than_a_chunk" takes two prefill steps of 16
    tokens; "cached_prefix" starts with PREFIX_LENGTH tokens to be cached beforehand."""
    return tokens(LENGTHS[kind], salt)


def engine(**kv_transfer):
    return LLM(**ENGINE, kv_transfer_config=kv_transfer) if kv_transfer else LLM(**ENGINE)


def settle(llm: LLM) -> None:
    """Step until every transfer ended, then check: every block free (free + used ==
    total), no lease or load left on any rank, nothing half-reported."""
    core, scheduler = llm.engine.core, llm.engine.core.scheduler
    while core.has_unfinished_requests() or scheduler.sending:  # until every lease ended:
        if scheduler.sending:  # a decode side's release may still be on its way
            core.kv_transfer.wait_for_news()
        llm.engine.step()  # collects them
    scheduler.check_invariants()
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert not scheduler.sending and not scheduler.loading
    kv_transfer = core.kv_transfer
    if kv_transfer is not None:
        assert (kv_transfer.num_active_leases, kv_transfer.num_active_loads) == (0, 0)
        assert kv_transfer.reports is None or kv_transfer.reports.num_pending == 0


_ids = iter(range(10**6))


def generate(llm: LLM, prompt: list[int], max_tokens: int = MAX_TOKENS, kv_transfer_params=None,
             **params):
    request_id = f"req-{next(_ids)}"
    llm.engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens,
                                                              temperature=0.0, **params),
                           kv_transfer_params=kv_transfer_params)
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished and out.request_id == request_id:
                result = out
    return result


def prefill(llm: LLM, prompt: list[int]) -> dict:
    out = generate(llm, prompt, max_tokens=1, kv_transfer_params=DO_REMOTE_DECODE)
    params = out.kv_transfer_params
    assert (params["num_tokens"], params["engine_id"]) == (len(prompt),
                                                          llm.engine.core.kv_transfer.engine_id)
    return params


def black_hole() -> socket.socket:
    """A listener that accepts connections into its backlog and never answers."""
    return socket.create_server(("127.0.0.1", 0))


def redirected(params: dict, address: str) -> dict:
    return {**params, "ranks": [{**rank, "address": address} for rank in params["ranks"]]}


def release(params: dict) -> None:
    """What the stalled reader would have done: the real leases end now."""
    for rank in params["ranks"]:
        client = connect(rank["address"], 5.0)
        client.release(params["transfer_id"], 5.0)
        client.close()
