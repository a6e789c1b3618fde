"""Preemption by recompute when blocks run out: who goes, what is sent, how it comes back."""

from __future__ import annotations

import pytest
from sched_helpers import make_request, make_scheduler, step

from fleetlm.executor.request import RequestStatus


def test_newest_request_is_preempted_and_recomputed_later():
    scheduler = make_scheduler(num_blocks=4, enable_caching=False)
    a = make_request("a", 7, max_tokens=4)
    b = make_request("b", 7)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out, _ = step(scheduler)
    assert [r.block_ids for r in out.scheduled_new_reqs] == [[0, 1], [2, 3]]
    assert step(scheduler)[0].num_scheduled_tokens == {"a": 1, "b": 1}

    out, _ = step(scheduler)  # a's 9th token needs a third block: b goes
    assert out.num_scheduled_tokens == {"a": 1}
    assert out.scheduled_cached_reqs.new_block_ids == [[3]]
    assert out.finished_req_ids == {"b"}
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert scheduler.stats()["num_preemptions"] == 1
    assert b.output_token_ids == [500, 501]

    out, results = step(scheduler)  # b needs 3 blocks for 9 tokens; 1 is free
    assert out.num_scheduled_tokens == {"a": 1}
    assert results["a"].finish_reason == "length"

    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"b": 9}
    (new,) = out.scheduled_new_reqs
    assert (new.req_id, new.num_computed_tokens, new.num_prompt_tokens) == ("b", 0, 7)
    assert new.token_ids == b.prompt_token_ids + [500, 501]
    assert new.block_ids == [2, 3, 1]
    assert out.finished_req_ids == {"a"}
    assert results["b"].new_token_ids == [502]
    assert b.output_token_ids == [500, 501, 502]


def test_resumed_request_hits_its_own_cached_blocks():
    scheduler = make_scheduler(num_blocks=5)
    scheduler.add_request(make_request("a", 8, max_tokens=3))
    b = make_request("b", 8)
    scheduler.add_request(b)
    step(scheduler)
    out, _ = step(scheduler)  # a takes block 4, b finds none and preempts itself
    assert (out.num_scheduled_tokens, out.finished_req_ids) == ({"a": 1}, {"b"})
    out, results = step(scheduler)  # b's 2 hits are free, but no third block is
    assert out.num_scheduled_tokens == {"a": 1}
    assert results["a"].finish_reason == "length"
    out, _ = step(scheduler)
    (new,) = out.scheduled_new_reqs
    assert (new.block_ids, new.num_computed_tokens) == ([2, 3, 4], 8)
    assert out.num_scheduled_tokens == {"b": 1}
    assert b.num_cached_tokens == 0  # set once, at its first scheduling


@pytest.mark.parametrize(("policy", "victim", "kept"), [("priority", "b", "c"), ("fcfs", "c", "b")])
def test_preemption_victim_follows_the_policy(policy, victim, kept):
    scheduler = make_scheduler(num_blocks=5, enable_caching=False, policy=policy)
    scheduler.add_request(make_request("a", 7, arrival_time=1.0, priority=0))
    scheduler.add_request(make_request("b", 3, arrival_time=2.0, priority=2))
    scheduler.add_request(make_request("c", 3, arrival_time=3.0, priority=1))
    step(scheduler)
    step(scheduler)
    out, _ = step(scheduler)  # a takes the last block; the next to grow preempts
    assert out.num_scheduled_tokens == {"a": 1, kept: 1}
    assert out.finished_req_ids == {victim}
    assert scheduler.requests[victim].status == RequestStatus.PREEMPTED


def test_no_admissions_in_a_step_that_preempted():
    scheduler = make_scheduler(num_blocks=4, enable_caching=False, policy="priority")
    scheduler.add_request(make_request("a", 8, arrival_time=1.0, priority=0))
    scheduler.add_request(make_request("b", 8, arrival_time=2.0, priority=1))
    step(scheduler)
    scheduler.add_request(make_request("c", 2, arrival_time=3.0, priority=0))
    out, _ = step(scheduler)  # b is preempted; c would fit in the block left over
    assert (out.num_scheduled_tokens, out.finished_req_ids) == ({"a": 1}, {"b"})
    assert scheduler.kv_cache_manager.num_free_blocks == 1
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "c": 2}


def test_a_request_alone_never_crashes_when_the_cache_is_full():
    scheduler = make_scheduler(num_blocks=2, enable_caching=False)
    request = make_request("a", 5)
    scheduler.add_request(request)
    finish_reasons = [step(scheduler)[1]["a"].finish_reason for _ in range(3)]
    assert finish_reasons == [None, None, "length"]  # the cache holds 8 tokens
    assert request.num_tokens == 8
    assert scheduler.num_preemptions == 0


def test_aborting_a_preempted_request():
    scheduler = make_scheduler(num_blocks=4, enable_caching=False)
    scheduler.add_request(make_request("a", 8))
    scheduler.add_request(make_request("b", 8))
    step(scheduler)
    step(scheduler)
    assert scheduler.requests["b"].status == RequestStatus.PREEMPTED
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 0)
    assert scheduler.schedule().finished_req_ids == {"b"}
    scheduler.check_invariants()
