"""The token-budget scheduler on CPU with hand-built runner outputs: exact tokens per step."""

from __future__ import annotations

import pytest
from sched_helpers import EOS, make_request, make_scheduler, runner_output, step

from fleetlm.executor.outputs import ModelRunnerOutput
from fleetlm.executor.request import RequestStatus
from fleetlm.executor.scheduler import SchedulerQueueFullError


def test_chunked_prefill_under_a_small_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    for request_id, num_tokens in [("a", 12), ("b", 7), ("c", 3)]:
        scheduler.add_request(make_request(request_id, num_tokens))

    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"a": 10}
    assert [(r.req_id, r.block_ids, r.num_computed_tokens) for r in out.scheduled_new_reqs] == [
        ("a", [0, 1, 2], 0),
    ]
    assert results == {}  # a prompt chunk samples nothing

    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"a": 2, "b": 7, "c": 1}
    assert out.scheduled_cached_reqs.req_ids == ["a"]
    assert out.scheduled_cached_reqs.new_block_ids == [[]]
    assert out.scheduled_cached_reqs.num_computed_tokens == [10]
    assert [(r.req_id, r.block_ids) for r in out.scheduled_new_reqs] == [("b", [3, 4]), ("c", [5])]
    assert {k: v.new_token_ids for k, v in results.items()} == {"a": [500], "b": [500]}

    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1, "c": 2}
    assert out.scheduled_cached_reqs.new_block_ids == [[6], [], []]  # a's 13th token
    assert set(results) == {"a", "b", "c"}

    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1, "c": 1}
    assert out.total_num_scheduled_tokens == 3


def test_running_requests_spend_the_budget_first():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", 3))
    scheduler.add_request(make_request("b", 6))
    scheduled = [step(scheduler)[0].num_scheduled_tokens for _ in range(4)]
    assert scheduled == [
        {"a": 3, "b": 1},
        {"a": 1, "b": 3},
        {"a": 1, "b": 2},
        {"a": 1, "b": 1},
    ]


def test_max_num_seqs_holds_later_requests_back():
    scheduler = make_scheduler(max_num_seqs=2)
    scheduler.add_request(make_request("a", 4, max_tokens=2))
    scheduler.add_request(make_request("b", 4, max_tokens=5))
    scheduler.add_request(make_request("c", 4))
    assert step(scheduler)[0].num_scheduled_tokens == {"a": 4, "b": 4}
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    out, results = step(scheduler)
    assert results["a"].finish_reason == "length"
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"b": 1, "c": 4}
    assert out.finished_req_ids == {"a"}


def test_prefix_hit_schedules_only_the_rest():
    scheduler = make_scheduler()
    prefix = list(range(100, 108))
    scheduler.add_request(make_request("a", prefix + [1, 2]))
    step(scheduler)
    scheduler.add_request(make_request("b", prefix + [7, 7, 7]))
    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "b": 3}
    (new,) = out.scheduled_new_reqs
    assert (new.block_ids, new.num_computed_tokens) == ([0, 1, 3], 8)
    assert results["b"].num_cached_tokens == 8
    assert scheduler.stats()["prefix_cache_queries"] == 10 + 11
    assert scheduler.stats()["prefix_cache_hits"] == 8


@pytest.mark.parametrize(("prompt_len", "num_cached"), [(9, 8), (8, 4)])
def test_whole_prompt_hit_still_computes_the_last_token(prompt_len, num_cached):
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", list(range(100, 112))))
    step(scheduler)
    scheduler.add_request(make_request("b", list(range(100, 100 + prompt_len))))
    out, results = step(scheduler)
    assert out.num_scheduled_tokens["b"] == prompt_len - num_cached
    assert results["b"].num_cached_tokens == num_cached
    assert results["b"].new_token_ids == [500]


def test_requests_in_one_step_hit_each_others_blocks():
    scheduler = make_scheduler()
    prompt = list(range(100, 110))
    scheduler.add_request(make_request("a", prompt))
    scheduler.add_request(make_request("b", prompt))
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"a": 10, "b": 2}
    assert [r.block_ids for r in out.scheduled_new_reqs] == [[0, 1, 2], [0, 1, 3]]


@pytest.mark.parametrize(
    ("params", "tokens", "expected_outputs", "finish_reason", "stop_reason"),
    [
        ({}, [7, EOS], [7, EOS], "stop", None),
        ({"stop_token_ids": [9]}, [7, 9], [7, 9], "stop", 9),
        ({"max_tokens": 3}, [7, 7, 7], [7, 7, 7], "length", None),
        ({"min_tokens": 2}, [EOS, EOS], [EOS, EOS], "stop", None),
        ({"ignore_eos": True, "max_tokens": 3}, [EOS, EOS, EOS], [EOS, EOS, EOS], "length", None),
    ],
)
def test_finishes(params, tokens, expected_outputs, finish_reason, stop_reason):
    scheduler = make_scheduler(num_blocks=8)
    request = make_request("a", 5, **params)
    scheduler.add_request(request)
    results = [step(scheduler, {"a": token})[1]["a"] for token in tokens]
    assert [r.finish_reason for r in results] == [None] * (len(tokens) - 1) + [finish_reason]
    assert request.output_token_ids == expected_outputs
    assert (request.stop_reason, results[-1].stop_reason) == (stop_reason, stop_reason)
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_req_ids == {"a"}


def test_context_length_ends_with_length():
    scheduler = make_scheduler(max_model_len=7)
    scheduler.add_request(make_request("a", 5))
    results = [step(scheduler)[1]["a"].finish_reason for _ in range(2)]
    assert results == [None, "length"]


def test_context_is_capped_by_the_cache_size():
    scheduler = make_scheduler(num_blocks=2, max_model_len=1024)
    assert scheduler.max_model_len == 8
    with pytest.raises(ValueError, match="context length 8"):
        scheduler.add_request(make_request("a", 9))


def test_aborts_free_blocks_at_once_in_any_state():
    scheduler = make_scheduler(num_blocks=8, max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", 8))
    scheduler.add_request(make_request("b", 8))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 8}
    scheduler.finish_requests(["b", "unknown"], RequestStatus.FINISHED_ABORTED)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    assert not scheduler.has_unfinished_requests()
    # The step that was already scheduled comes back: the aborted request yields nothing.
    assert scheduler.update_from_output(out, ModelRunnerOutput(["a"], [[5]])) == []
    assert scheduler.schedule().finished_req_ids == {"a", "b"}
    scheduler.check_invariants()


def test_finish_requests_needs_a_finished_status():
    with pytest.raises(ValueError, match="finished status"):
        make_scheduler().finish_requests(["a"], RequestStatus.RUNNING)


def test_logprobs_and_prompt_logprobs_pass_through():
    scheduler = make_scheduler(max_num_batched_tokens=3)
    scheduler.add_request(make_request("a", 5, prompt_logprobs=0, logprobs=1))
    out = scheduler.schedule()
    chunk = [None, [(11, -0.5)], [(12, -0.25)]]
    results = scheduler.update_from_output(
        out, ModelRunnerOutput(["a"], [[]], prompt_logprobs={"a": chunk})
    )
    assert [(r.new_token_ids, r.new_prompt_logprobs) for r in results] == [([], chunk)]
    out = scheduler.schedule()
    sampled = [[(7, -0.1), (8, -2.0)]]
    (result,) = scheduler.update_from_output(
        out, ModelRunnerOutput(["a"], [[7]], logprobs={"a": sampled})
    )
    assert (result.new_token_ids, result.new_logprobs) == ([7], sampled)


def test_next_schedule_may_run_before_the_update():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", 2))
    scheduler.add_request(make_request("b", 6))
    first = scheduler.schedule()
    first_samples = runner_output(scheduler, first)
    second = scheduler.schedule()
    second_samples = runner_output(scheduler, second)
    assert first.num_scheduled_tokens == {"a": 2, "b": 2}
    assert second.num_scheduled_tokens == {"b": 4}  # a waits for its sampled token
    scheduler.update_from_output(first, first_samples)
    scheduler.update_from_output(second, second_samples)
    assert scheduler.schedule().num_scheduled_tokens == {"a": 1, "b": 1}


def test_priority_policy_admits_by_priority_then_arrival():
    scheduler = make_scheduler(max_num_seqs=1, policy="priority")
    for request_id, priority in [("a", 1), ("b", 0), ("c", 2), ("d", 0)]:
        arrival = float(ord(request_id))
        scheduler.add_request(make_request(request_id, 3, arrival, priority, max_tokens=1))
    admitted = [step(scheduler)[0].scheduled_new_reqs[0].req_id for _ in range(4)]
    assert admitted == ["b", "d", "a", "c"]


def test_add_request_validates():
    scheduler = make_scheduler(max_num_waiting=1)
    scheduler.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", 3))
    with pytest.raises(SchedulerQueueFullError):
        scheduler.add_request(make_request("b", 3))
    with pytest.raises(ValueError, match="between 1 and"):
        make_scheduler().add_request(make_request("c", []))
    with pytest.raises(ValueError, match="policy must be one of"):
        make_scheduler(policy="lifo")


def test_stats():
    scheduler = make_scheduler(num_blocks=4, max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", 5))
    scheduler.add_request(make_request("b", 5))
    step(scheduler)
    stats = scheduler.stats()
    assert stats.pop("transfers") is scheduler.transfer_stats
    assert stats == {
        "num_running": 1,
        "num_waiting": 1,
        "kv_cache_usage": 0.25,
        "num_kv_blocks": 4,
        "prefix_cache_queries": 5,
        "prefix_cache_hits": 0,
        "num_preemptions": 0,
        "num_active_leases": 0,
    }
