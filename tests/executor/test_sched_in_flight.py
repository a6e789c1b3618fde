"""Several steps in flight (pipeline parallelism): consecutive steps hold different requests,
and a step's sample for a request preempted while the step ran is dropped."""

from __future__ import annotations

from sched_helpers import make_request, make_scheduler, runner_output

from fleetlm.executor.outputs import ModelRunnerOutput


def test_steps_in_flight_take_turns_with_the_requests():
    scheduler = make_scheduler(num_micro_batches=2)
    for name in ("a", "b", "c", "d"):
        scheduler.add_request(make_request(name, 4))
    first = scheduler.schedule()
    second = scheduler.schedule()  # the first is still in flight
    assert list(first.num_scheduled_tokens) == ["a", "b"]
    assert list(second.num_scheduled_tokens) == ["c", "d"]
    assert scheduler.schedule().is_empty  # every request is in flight
    scheduler.update_from_output(first, runner_output(scheduler, first))
    third = scheduler.schedule()
    assert third.num_scheduled_tokens == {"a": 1, "b": 1}
    assert third.scheduled_cached_reqs.new_token_ids == [[500], [500]]  # the samples travel
    scheduler.update_from_output(second, runner_output(scheduler, second))
    assert scheduler.schedule().num_scheduled_tokens == {"c": 1, "d": 1}
    scheduler.check_invariants()


def test_one_step_at_a_time_takes_every_request():
    scheduler = make_scheduler()
    for name in ("a", "b", "c"):
        scheduler.add_request(make_request(name, 4))
    assert list(scheduler.schedule().num_scheduled_tokens) == ["a", "b", "c"]


def test_a_sample_from_before_a_preemption_is_dropped():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", 4))
    stale = scheduler.schedule()  # in flight while ...
    request = scheduler.requests["r"]
    scheduler.running.remove(request)
    scheduler._preempt(request)  # ... a higher-priority request's blocks preempt it
    fresh = scheduler.schedule()  # and it is admitted again before the stale step returns
    assert fresh.scheduled_new_reqs[0].req_id == "r"
    assert scheduler.update_from_output(stale, ModelRunnerOutput(["r"], [[777]])) == []
    assert request.num_output_tokens == 0
    outputs = scheduler.update_from_output(fresh, runner_output(scheduler, fresh))
    assert [o.new_token_ids for o in outputs] == [[500]]
    scheduler.check_invariants()
