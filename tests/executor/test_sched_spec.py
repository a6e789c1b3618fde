"""Speculative decoding on the scheduler side: drafts in the token budget, rejected positions
given back, only known tokens cached, the adaptive controller, n-gram lookup; block-pool
invariants through a long run with many rejections."""

from __future__ import annotations

import random

import numpy as np
from sched_helpers import make_request, make_scheduler

from fleetlm.executor.config import SpeculativeConfig
from fleetlm.executor.outputs import ModelRunnerOutput
from fleetlm.executor.spec.controller import SpecDecodeController
from fleetlm.executor.spec.proposers import ngram_lookup


def _spec_scheduler(k=3, **config):
    controller = SpecDecodeController(SpeculativeConfig(num_speculative_tokens=k))
    return make_scheduler(spec=controller, **config), controller


def _decode_once(scheduler, req_id, token):
    out = scheduler.schedule()
    scheduler.update_from_output(out, ModelRunnerOutput([req_id], [[token]]))
    return out


def test_drafts_count_in_the_budget_and_rejected_positions_are_given_back():
    scheduler, controller = _spec_scheduler()
    scheduler.add_request(make_request("r", 6))  # 6 prompt tokens
    prefill = scheduler.schedule()
    assert prefill.num_draft_tokens == {"r": 3}  # propose 3 drafts after this step
    scheduler.update_from_output(prefill, ModelRunnerOutput(["r"], [[100]],
                                                            draft_token_ids={"r": [7, 8, 9]}))
    request = scheduler.requests["r"]
    assert request.spec_token_ids == [7, 8, 9]
    verify = scheduler.schedule()
    assert verify.num_scheduled_tokens == {"r": 4}  # the last token and 3 drafts
    assert verify.scheduled_spec_decode_tokens == {"r": [7, 8, 9]}
    assert verify.scheduled_cached_reqs.new_token_ids == [[100]]
    assert request.num_computed_tokens == 10
    # 7 accepted, 8 rejected: the target emits 7 and its own 42
    scheduler.update_from_output(verify, ModelRunnerOutput(["r"], [[7, 42]]))
    assert request.all_token_ids[-3:] == [100, 7, 42]
    assert request.num_computed_tokens == 8  # 6 prompt + 100 + 7; 42 is not computed yet
    assert controller.stats.num_draft_tokens == 3 and controller.stats.num_accepted_tokens == 1
    assert controller.stats.accepted_per_position == [1, 0, 0]
    # Only blocks full of known tokens are ever cached: block 1 (positions 4..7) held a draft
    # when it was allocated, so it is cached only at the next allocation, with token 7 known.
    manager = scheduler.kv_cache_manager
    assert manager.num_cached_blocks["r"] == 1
    next_step = scheduler.schedule()
    assert manager.num_cached_blocks["r"] == 2
    assert manager._block_tokens(request, 1)[-2:] == [100, 7]
    assert next_step.scheduled_cached_reqs.new_token_ids == [[7, 42]]
    assert next_step.num_scheduled_tokens == {"r": 1}  # no drafts were proposed this time
    scheduler.check_invariants()


def test_drafts_never_go_past_max_tokens_or_the_budget():
    scheduler, _ = _spec_scheduler(k=4, max_num_batched_tokens=3)
    scheduler.add_request(make_request("r", 2, max_tokens=3))
    out = scheduler.schedule()
    scheduler.update_from_output(out, ModelRunnerOutput(["r"], [[5]],
                                                        draft_token_ids={"r": [1, 2, 3, 4]}))
    # budget 3 allows 2 drafts; max_tokens 3 with 1 output allows 1 (the target adds one)
    assert scheduler.schedule().scheduled_spec_decode_tokens == {"r": [1]}


def test_fewer_drafts_as_acceptance_falls():
    controller = SpecDecodeController(SpeculativeConfig(num_speculative_tokens=4,
                                                        min_acceptance_rate=0.1))
    controller.record("r", 4, 1)  # average 1 -> 0.625: still all 4
    assert controller.num_drafts("r", 1) == 4
    controller.record("r", 4, 0)  # -> 0.3125: ceil(2 * 4 * 0.3125) = 3
    assert controller.num_drafts("r", 1) == 3
    controller.record("r", 3, 0)  # -> 0.156: 2
    assert controller.num_drafts("r", 1) == 2


def test_a_request_that_stops_paying_stops_speculating_then_probes():
    config = SpeculativeConfig(num_speculative_tokens=2, min_acceptance_rate=0.3,
                               probe_interval=3, disable_by_batch_size=8)
    controller = SpecDecodeController(config)
    assert controller.num_drafts("r", num_running=1) == 2
    controller.record("r", 2, 0)
    controller.record("r", 2, 0)  # average acceptance 1 -> 0.5 -> 0.25
    assert [controller.num_drafts("r", 1) for _ in range(6)] == [0, 0, 1, 0, 0, 1]  # probes
    controller.record("r", 1, 1)  # a probe pays: speculation is back
    assert controller.num_drafts("r", 1) == 2
    assert controller.num_drafts("r", num_running=8) == 0  # a large batch: nobody
    assert controller.stats.mean_accepted_length == 1 + 1 / 3


def test_rejected_probes_come_less_often_and_an_accepted_one_restores_the_interval():
    controller = SpecDecodeController(SpeculativeConfig(
        num_speculative_tokens=4, min_acceptance_rate=0.3, probe_interval=2))
    for _ in range(3):
        controller.record("r", 4, 0)  # acceptance 1 -> 0.125: off

    def steps_to_next_probe() -> int:
        steps = 1
        while controller.num_drafts("r", 1) == 0:
            steps += 1
        return steps

    gaps = []
    for _ in range(5):
        gaps.append(steps_to_next_probe())
        controller.record("r", 1, 0)
    assert gaps == [2, 4, 8, 16, 16]  # doubling up to MAX_PROBE_BACKOFF x probe_interval
    assert steps_to_next_probe() == 16
    controller.record("r", 1, 1)  # accepted: the average jumps to about 0.5, on again
    assert controller.num_drafts("r", 1) == 4
    for _ in range(2):
        controller.record("r", 4, 0)  # off again: probing starts from probe_interval
    assert steps_to_next_probe() == 2


def test_ngram_lookup_takes_the_latest_longest_match():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3])
    assert ngram_lookup(tokens, 1, 3, k=2) == [8, 5]  # "1 2 3" last seen before 8 5
    assert ngram_lookup(tokens, 1, 3, k=10) == [8, 5, 1, 2, 3]  # up to the end
    assert ngram_lookup(np.array([4, 5, 6]), 1, 3, k=2) == []
    assert ngram_lookup(np.array([7, 1, 7]), 2, 3, k=2) == []  # shorter than min_n


def test_invariants_hold_through_many_rejections():
    rng = random.Random(0)
    scheduler, controller = _spec_scheduler(k=4, max_num_seqs=6, num_blocks=40,
                                            max_model_len=64)
    for i in range(24):
        scheduler.add_request(make_request(f"r{i}", rng.randint(1, 20),
                                           max_tokens=rng.randint(1, 30)))
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        req_ids = list(out.num_scheduled_tokens)
        sampled, drafts = [], {}
        for req_id in req_ids:
            request = scheduler.requests[req_id]
            spec = out.scheduled_spec_decode_tokens.get(req_id, [])
            if request.num_computed_tokens - len(spec) < request.num_tokens:
                sampled.append([])  # a prefill chunk
                continue
            accepted = spec[:rng.randint(0, len(spec))]
            sampled.append(accepted + [rng.randint(3, 99)])
            if req_id in out.num_draft_tokens:
                drafts[req_id] = [rng.randint(3, 99) for _ in range(out.num_draft_tokens[req_id])]
        scheduler.update_from_output(out, ModelRunnerOutput(req_ids, sampled,
                                                            draft_token_ids=drafts))
        scheduler.check_invariants()
        for request in scheduler.running:  # every computed position holds a known token
            assert request.num_computed_tokens <= request.num_tokens
    assert scheduler.kv_cache_manager.num_free_blocks == 40
    assert controller.stats.num_draft_tokens > 100
    assert 0 < controller.stats.num_accepted_tokens < controller.stats.num_draft_tokens
