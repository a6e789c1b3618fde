"""The scheduler's use of the scheduler-side KV connector, with a fake connector."""

from __future__ import annotations

from sched_helpers import make_request, make_scheduler, step

from fleetlm.executor.outputs import KVConnectorOutput, ModelRunnerOutput
from fleetlm.executor.request import Request, RequestStatus
from fleetlm.kvtransfer.base import KVConnectorMetadata, KVConnectorScheduler


class FakeMetadata(KVConnectorMetadata):
    def __init__(self, loads) -> None:
        self.loads = loads


class FakeConnector(KVConnectorScheduler):
    """Offers `matches[req_id]` remote tokens and keeps the blocks of `keep_blocks` alive;
    records every call; tells the workers which requests load in the step they were
    admitted."""

    def __init__(self, matches=None, keep_blocks=(), failure_policy="recompute") -> None:
        self.matches: dict[str, tuple[int | None, bool]] = dict(matches or {})
        self.keep_blocks = set(keep_blocks)
        self.failure_policy = failure_policy
        self.asked: list[tuple[str, int]] = []
        self.allocs: list[tuple[str, list[int], int]] = []
        self.finished: list[tuple[str, list[int]]] = []
        self.new_loads: list[str] = []

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        self.asked.append((request.request_id, num_computed_tokens))
        return self.matches.get(request.request_id, (0, False))

    def update_state_after_alloc(self, request: Request, block_ids, num_external_tokens) -> None:
        self.allocs.append((request.request_id, list(block_ids), num_external_tokens))
        if num_external_tokens:
            self.new_loads.append(request.request_id)

    def request_finished(self, request: Request, block_ids):
        self.finished.append((request.request_id, list(block_ids)))
        is_kept = request.request_id in self.keep_blocks
        return is_kept, {"transfer_id": f"t-{request.request_id}"} if is_kept else None

    def build_connector_meta(self):
        loads, self.new_loads = self.new_loads, []
        return FakeMetadata(loads) if loads else None


def transfer_news(scheduler, **news):
    """Step with the workers reporting only `news` (a KVConnectorOutput's fields)."""
    output = scheduler.schedule()
    runner_output = ModelRunnerOutput([], [], kv_connector_output=KVConnectorOutput(**news))
    results = scheduler.update_from_output(output, runner_output)
    scheduler.check_invariants()
    return output, {o.req_id: o for o in results}


def test_synchronous_remote_tokens_count_as_computed():
    connector = FakeConnector({"r": (8, False)})
    scheduler = make_scheduler(connector=connector)
    prompt = list(range(100, 110))
    scheduler.add_request(make_request("r", prompt))
    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"r": 2}
    (new,) = out.scheduled_new_reqs
    assert (new.block_ids, new.num_computed_tokens) == ([0, 1, 2], 8)
    assert connector.allocs == [("r", [0, 1, 2], 8)]
    assert results["r"].num_cached_tokens == 8
    # Loaded blocks are cached like computed ones: a later request hits them locally.
    scheduler.add_request(make_request("s", prompt))
    out, _ = step(scheduler)
    assert connector.asked == [("r", 0), ("s", 8)]
    assert out.num_scheduled_tokens == {"r": 1, "s": 2}


def test_remote_tokens_leave_the_last_token_to_compute():
    connector = FakeConnector({"r": (10, False)})
    scheduler = make_scheduler(connector=connector)
    scheduler.add_request(make_request("r", 10))
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"r": 1}
    assert connector.allocs == [("r", [0, 1, 2], 9)]


def test_ask_later_keeps_the_request_waiting_and_lets_others_pass():
    connector = FakeConnector({"r": (None, False)})
    scheduler = make_scheduler(connector=connector)
    scheduler.add_request(make_request("r", 5))
    scheduler.add_request(make_request("s", 3))
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"s": 3}
    assert (scheduler.num_waiting, connector.allocs) == (1, [("s", [0], 0)])
    connector.matches["r"] = (4, False)
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"s": 1, "r": 1}
    assert connector.asked == [("r", 0), ("s", 0), ("r", 0)]


def test_asynchronous_load_waits_for_finish_receiving():
    connector = FakeConnector({"r": (8, True)})
    scheduler = make_scheduler(connector=connector)
    request = make_request("r", 10)
    scheduler.add_request(request)
    for _ in range(2):
        out, _ = step(scheduler)
        assert out.num_scheduled_tokens == {}
    assert connector.allocs == [("r", [0, 1, 2], 8)]  # blocks for the whole prompt
    assert scheduler.kv_cache_manager.get_block_ids("r") == [0, 1, 2]
    assert scheduler.kv_cache_manager.block_pool.cached_blocks == {}  # KV not there yet
    assert (scheduler.num_waiting, scheduler.num_running) == (1, 0)
    assert request.status == RequestStatus.WAITING

    scheduler.finish_receiving(["r", "unknown"])
    assert len(scheduler.kv_cache_manager.block_pool.cached_blocks) == 2
    stats = scheduler.transfer_stats  # one load of 2 blocks (tokens 0..7), timed
    assert (stats.num_loads_done, stats.num_blocks_loaded, sum(stats.latency.counts),
            stats.failures_by_cause) == (1, 2, 1, {})
    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"r": 2}
    (new,) = out.scheduled_new_reqs
    assert (new.block_ids, new.num_computed_tokens) == ([0, 1, 2], 8)
    assert len(connector.allocs) == 1
    assert results["r"].new_token_ids == [500]
    assert results["r"].num_cached_tokens == 8


def test_blocks_stay_alive_until_sent():
    connector = FakeConnector(keep_blocks={"r"})
    scheduler = make_scheduler(num_blocks=8, connector=connector)
    scheduler.add_request(make_request("r", 5, max_tokens=1))
    _, results = step(scheduler)
    assert results["r"].finish_reason == "length"
    assert results["r"].kv_transfer_params == {"transfer_id": "t-r"}  # for the caller
    assert connector.finished == [("r", [0, 1])]
    assert scheduler.kv_cache_manager.num_free_blocks == 6
    assert not scheduler.has_unfinished_requests()
    scheduler.finish_sending(["r", "unknown"])
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    scheduler.check_invariants()


def test_aborting_a_loading_request_frees_its_blocks():
    connector = FakeConnector({"r": (8, True)})
    scheduler = make_scheduler(num_blocks=8, connector=connector)
    scheduler.add_request(make_request("r", 10))
    step(scheduler)
    scheduler.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert connector.finished == [("r", [0, 1, 2])]
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    assert scheduler.num_waiting == 0
    scheduler.finish_receiving(["r"])  # a late report is ignored
    scheduler.check_invariants()


def test_loads_reach_the_workers_in_the_step_that_admits_them():
    connector = FakeConnector({"r": (8, True), "s": (0, False)})
    scheduler = make_scheduler(connector=connector)
    scheduler.add_request(make_request("r", 10))
    scheduler.add_request(make_request("s", 3))
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"s": 3}
    assert out.kv_connector_metadata.loads == ["r"]
    out, _ = step(scheduler)
    assert out.kv_connector_metadata is None


def test_the_workers_news_frees_sent_blocks_and_releases_loaded_requests():
    connector = FakeConnector({"r": (8, True)}, keep_blocks={"p"})
    scheduler = make_scheduler(num_blocks=8, connector=connector)
    scheduler.add_request(make_request("p", 5, max_tokens=1))
    scheduler.add_request(make_request("r", 10))
    step(scheduler)
    assert scheduler.kv_cache_manager.num_free_blocks == 8 - 2 - 3
    out, _ = transfer_news(scheduler, finished_sending={"p"}, finished_recving={"r"})
    assert out.is_empty
    assert scheduler.kv_cache_manager.num_free_blocks == 8 - 3
    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"r": 2}
    assert results["r"].new_token_ids == [500]


def test_a_failed_load_is_recomputed_after_the_local_prefix_never_served():
    """A failed load must not mark the tokens computed: their blocks hold garbage."""
    connector = FakeConnector({"r": (8, True)})
    scheduler = make_scheduler(connector=connector, max_num_batched_tokens=6)
    prompt = list(range(100, 114))
    scheduler.add_request(make_request("a", prompt[:5], max_tokens=1))
    step(scheduler)  # "a" leaves its first block (4 tokens) in the prefix cache
    scheduler.add_request(make_request("r", prompt))
    step(scheduler)
    assert connector.asked[-1] == ("r", 4)
    assert scheduler.kv_cache_manager.get_block_ids("r") == [0, 2, 3, 4]
    _, results = transfer_news(scheduler, failed_recving={"r": "timeout"})
    assert results == {}
    assert len(scheduler.kv_cache_manager.block_pool.cached_blocks) == 1  # only the hit
    out, results = step(scheduler)  # tokens 4..9, then 10..13: computed here
    assert out.num_scheduled_tokens == {"r": 6}
    assert out.scheduled_new_reqs[0].num_computed_tokens == 4
    assert results == {}
    out, results = step(scheduler)
    assert out.num_scheduled_tokens == {"r": 4}
    assert results["r"].new_token_ids == [500]
    assert results["r"].num_cached_tokens == 4
    scheduler.finish_receiving(["r"])  # a late success report changes nothing
    scheduler.check_invariants()
    stats = scheduler.transfer_stats
    assert (stats.num_loads_done, stats.failures_by_cause) == (0, {"timeout": 1})


def test_a_failed_load_finishes_the_request_with_an_error_under_the_fail_policy():
    connector = FakeConnector({"r": (8, True)}, failure_policy="fail")
    scheduler = make_scheduler(num_blocks=8, connector=connector)
    scheduler.add_request(make_request("r", 10))
    step(scheduler)
    _, results = transfer_news(scheduler, failed_recving={"r": "lease expired", "x": "?"})
    assert results["r"].finish_reason == "error"
    assert results["r"].stop_reason == "KV transfer failed: lease expired"
    assert scheduler.transfer_stats.failures_by_cause == {"lease expired": 1}
    assert results["r"].new_token_ids == []
    assert connector.finished == [("r", [0, 1, 2])]
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    assert not scheduler.has_unfinished_requests()
