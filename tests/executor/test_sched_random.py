"""A seeded random workload: arrivals, shared prefixes, EOS, aborts, preemptions and (with a
random connector) remote KV, with the invariants checked after every step and every block
free at the end."""

from __future__ import annotations

import random

import pytest
from sched_helpers import BLOCK_SIZE, EOS, make_request, make_scheduler

from fleetlm.executor.outputs import ModelRunnerOutput
from fleetlm.executor.request import Request, RequestStatus
from fleetlm.kvtransfer.base import KVConnectorScheduler

NUM_REQUESTS = 60
NUM_BLOCKS = 12
MAX_NUM_BATCHED_TOKENS = 16
MAX_NUM_SEQS = 5
MAX_MODEL_LEN = 40
MAX_STEPS = 3000


def token_at(request_id: str, position: int) -> int:
    """What the fake model samples: a function of the request and position only, so a
    recomputed request samples the same tokens again."""
    value = (sum(map(ord, request_id)) * 31 + position * 17) % 23
    return EOS if value == 0 else 10 + value


class RandomConnector(KVConnectorScheduler):
    """Offers random remote tokens, sync or async, sometimes "ask later"; keeps half of the
    finished requests' blocks for sending."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        if self.rng.random() < 0.1:
            return None, False
        num_tokens = self.rng.randint(0, request.num_tokens - num_computed_tokens)
        return num_tokens, self.rng.random() < 0.5

    def update_state_after_alloc(self, request, block_ids, num_external_tokens) -> None:
        assert num_external_tokens < request.num_tokens  # the last token is computed locally
        assert len(block_ids) * BLOCK_SIZE > num_external_tokens

    def request_finished(self, request, block_ids):
        return self.rng.random() < 0.5, None


def random_request(rng: random.Random, index: int, prefixes: list[list[int]]) -> Request:
    prompt = rng.choice(prefixes) + [rng.randrange(10, 40) for _ in range(rng.randint(1, 12))]
    params = {"max_tokens": rng.randint(1, 12)}
    if rng.random() < 0.1:
        params["prompt_logprobs"] = 0
    return make_request(f"r{index}", prompt, float(index), rng.randint(0, 3), **params)


def runner_output(scheduler, output) -> ModelRunnerOutput:
    req_ids = list(output.num_scheduled_tokens)
    requests = [scheduler.requests[req_id] for req_id in req_ids]
    sampled = [
        [token_at(r.request_id, r.num_tokens)] if r.num_computed_tokens == r.num_tokens else []
        for r in requests
    ]
    return ModelRunnerOutput(req_ids, sampled)


def run_step(scheduler, rng: random.Random, streamed: dict[str, list[int]]) -> None:
    output = scheduler.schedule()
    scheduler.check_invariants()
    assert output.total_num_scheduled_tokens <= MAX_NUM_BATCHED_TOKENS
    assert len(output.num_scheduled_tokens) <= scheduler.num_running <= MAX_NUM_SEQS
    for result in scheduler.update_from_output(output, runner_output(scheduler, output)):
        streamed[result.req_id].extend(result.new_token_ids)
    scheduler.finish_receiving([r for r in sorted(scheduler.loading) if rng.random() < 0.3])
    scheduler.finish_sending([r for r in sorted(scheduler.sending) if rng.random() < 0.3])
    scheduler.check_invariants()


def run_workload(scheduler, rng: random.Random) -> tuple[list[Request], dict, set[str]]:
    """Drive requests to the end; return them, their streamed tokens and the aborted ids."""
    prefixes = [[rng.randrange(10, 40) for _ in range(8)] for _ in range(3)]
    pending = [random_request(rng, i, prefixes) for i in range(NUM_REQUESTS)]
    requests, streamed, aborted = list(pending), {r.request_id: [] for r in pending}, set()
    for _ in range(MAX_STEPS):
        if not (pending or scheduler.has_unfinished_requests() or scheduler.sending):
            return requests, streamed, aborted
        for _ in range(rng.randint(0, 2)):
            if pending:
                scheduler.add_request(pending.pop(0))
        if scheduler.requests and rng.random() < 0.05:
            victim = rng.choice(sorted(scheduler.requests))
            scheduler.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            aborted.add(victim)
        run_step(scheduler, rng, streamed)
    pytest.fail(f"not done after {MAX_STEPS} steps")


def check_finished_output(request: Request) -> None:
    outputs = request.output_token_ids
    positions = range(request.num_prompt_tokens, request.num_tokens)
    assert outputs == [token_at(request.request_id, p) for p in positions]
    assert EOS not in outputs[:-1]
    if outputs[-1] == EOS:
        assert request.status == RequestStatus.FINISHED_STOPPED
    else:
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert len(outputs) == request.max_tokens or request.num_tokens == MAX_MODEL_LEN


@pytest.mark.parametrize("is_connected", [False, True])
@pytest.mark.parametrize("enable_caching", [True, False])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_workload(policy, enable_caching, is_connected):
    rng = random.Random(20240611)
    scheduler = make_scheduler(
        num_blocks=NUM_BLOCKS,
        enable_caching=enable_caching,
        connector=RandomConnector(random.Random(7)) if is_connected else None,
        policy=policy,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=MAX_MODEL_LEN,
    )
    requests, streamed, aborted = run_workload(scheduler, rng)

    kv = scheduler.kv_cache_manager
    assert (kv.num_free_blocks, kv.usage, kv.req_to_blocks) == (NUM_BLOCKS, 0.0, {})
    assert scheduler.num_preemptions > 0
    assert (kv.prefix_cache_hits > 0) == enable_caching
    for request in requests:
        assert request.is_finished
        assert streamed[request.request_id] == request.output_token_ids  # none lost or repeated
        if request.request_id not in aborted:
            check_finished_output(request)
