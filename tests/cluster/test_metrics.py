"""Prometheus rendering of replica snapshots, read back with prometheus_client's own parser."""

from __future__ import annotations

import pickle

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlm.cluster.metrics import (
    INTER_TOKEN_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    MetricsRecorder,
    build_1_2_5_buckets,
    render_metrics,
)
from fleetlm.executor.protocol import EngineStats
from fleetlm.executor.transfer_stats import TRANSFER_LATENCY_BUCKETS, Histogram

MODEL = "smollm2-135m"


def _families(text: str) -> dict[str, dict]:
    """family name -> {(sample name, sorted label items): value}"""
    families = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = {"type": family.type, "samples": samples}
    return families


def _stats(**overrides) -> EngineStats:
    return EngineStats(**overrides)


def _replica_a() -> dict:
    recorder = MetricsRecorder(replica_id="a", max_model_len=2048)
    recorder.on_first_token(0.005)  # exactly on a bound: counts in le="0.005"
    recorder.on_first_token(0.3)
    for gap in (0.01, 0.02, 0.02):
        recorder.on_token(gap)
    recorder.on_finish(0.5, num_prompt_tokens=7, num_generation_tokens=3, finish_reason="stop")
    recorder.on_finish(9000.0, num_prompt_tokens=100, num_generation_tokens=1,
                       finish_reason="length")  # fmt: skip
    stats = _stats(
        num_running=2, num_waiting=1, kv_cache_usage=0.25, prefix_cache_queries=40,
        prefix_cache_hits=16, num_preemptions=1, num_prompt_tokens=107, num_generation_tokens=4,
        spec_num_drafts=3, spec_num_draft_tokens=9, spec_num_accepted_tokens=4,
        spec_accepted_per_position=(3, 1, 0),
    )  # fmt: skip
    return recorder.snapshot(stats, MODEL)


def _replica_b() -> dict:
    recorder = MetricsRecorder(replica_id="b", max_model_len=2048)
    recorder.on_first_token(0.125)
    recorder.on_token(100.0)  # above the last bound: only in +Inf
    recorder.on_finish(2.0, num_prompt_tokens=5, num_generation_tokens=2, finish_reason="stop")
    recorder.on_finish(1.0, num_prompt_tokens=5, num_generation_tokens=0, finish_reason="abort")
    stats = _stats(
        num_running=0, num_waiting=3, kv_cache_usage=0.5, prefix_cache_queries=10,
        prefix_cache_hits=5, num_preemptions=2, num_prompt_tokens=10, num_generation_tokens=2,
    )  # fmt: skip
    return recorder.snapshot(stats, MODEL)


@pytest.fixture
def families() -> dict[str, dict]:
    return _families(render_metrics([_replica_a(), _replica_b()]))


def test_gauges_are_per_replica(families):
    assert families["fleetlm:num_requests_running"]["samples"] == {
        ("fleetlm:num_requests_running", (("model_name", MODEL), ("replica", "a"))): 2.0,
        ("fleetlm:num_requests_running", (("model_name", MODEL), ("replica", "b"))): 0.0,
    }
    waiting = families["fleetlm:num_requests_waiting"]["samples"]
    assert sorted(waiting.values()) == [1.0, 3.0]
    usage = families["fleetlm:kv_cache_usage_perc"]
    assert usage["type"] == "gauge"
    assert sorted(usage["samples"].values()) == [0.25, 0.5]


@pytest.mark.parametrize(
    ("name", "total"),
    [
        ("prefix_cache_queries", 50.0),
        ("prefix_cache_hits", 21.0),
        ("num_preemptions", 3.0),
        ("prompt_tokens", 117.0),
        ("generation_tokens", 6.0),
        ("spec_decode_num_drafts", 3.0),
        ("spec_decode_num_draft_tokens", 9.0),
        ("spec_decode_num_accepted_tokens", 4.0),
    ],
)
def test_counters_are_summed_over_replicas(families, name, total):
    family = families[f"fleetlm:{name}"]
    assert family["type"] == "counter"
    assert family["samples"] == {(f"fleetlm:{name}_total", (("model_name", MODEL),)): total}


def test_accepted_drafts_per_position(families):
    # replica b runs without speculation: it adds nothing
    name = "fleetlm:spec_decode_num_accepted_tokens_per_pos"
    assert families[name]["samples"] == {
        (f"{name}_total", (("model_name", MODEL), ("position", str(i)))): float(n)
        for i, n in enumerate((3, 1, 0))
    }


def test_request_success_by_finished_reason(families):
    def key(reason):
        labels = (("finished_reason", reason), ("model_name", MODEL))
        return ("fleetlm:request_success_total", labels)

    assert families["fleetlm:request_success"]["samples"] == {
        key("abort"): 1.0, key("length"): 1.0, key("stop"): 2.0,
    }  # fmt: skip


def _buckets(families, name: str) -> dict[str, float]:
    samples = families[f"fleetlm:{name}"]["samples"]
    return {
        dict(labels)["le"]: value
        for (sample, labels), value in samples.items()
        if sample.endswith("_bucket")
    }


def _count_and_sum(families, name: str) -> tuple[float, float]:
    samples = families[f"fleetlm:{name}"]["samples"]
    labels = (("model_name", MODEL),)
    return samples[(f"fleetlm:{name}_count", labels)], samples[(f"fleetlm:{name}_sum", labels)]


def test_ttft_histogram_is_cumulative_with_vllm_buckets(families):
    buckets = _buckets(families, "time_to_first_token_seconds")
    assert [float(le) for le in buckets if le != "+Inf"] == list(TTFT_BUCKETS)
    assert buckets["0.001"] == 0.0
    assert buckets["0.005"] == 1.0  # 0.005 itself (le means <=)
    assert buckets["0.1"] == 1.0
    assert buckets["0.25"] == 2.0  # + 0.125 from replica b
    assert buckets["0.5"] == 3.0  # + 0.3
    assert buckets["+Inf"] == 3.0
    assert _count_and_sum(families, "time_to_first_token_seconds") == (3.0, 0.43)


def test_inter_token_latency_histogram(families):
    buckets = _buckets(families, "inter_token_latency_seconds")
    assert [float(le) for le in buckets if le != "+Inf"] == list(INTER_TOKEN_BUCKETS)
    assert buckets["0.01"] == 1.0
    assert buckets["0.025"] == 3.0
    assert buckets["80.0"] == 3.0
    assert buckets["+Inf"] == 4.0
    assert _count_and_sum(families, "inter_token_latency_seconds") == (4.0, 100.05)


def test_e2e_and_token_count_histograms(families):
    e2e = _buckets(families, "e2e_request_latency_seconds")
    assert [float(le) for le in e2e if le != "+Inf"] == list(REQUEST_LATENCY_BUCKETS)
    assert (e2e["0.3"], e2e["0.5"], e2e["1.0"], e2e["2.0"], e2e["7680.0"], e2e["+Inf"]) == (
        0.0, 1.0, 2.0, 3.0, 3.0, 4.0,
    )  # fmt: skip
    assert _count_and_sum(families, "e2e_request_latency_seconds") == (4.0, 9003.5)
    prompt = _buckets(families, "request_prompt_tokens")
    assert list(prompt) == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0",
                            "500.0", "1000.0", "2000.0", "+Inf"]  # fmt: skip
    assert (prompt["5.0"], prompt["10.0"], prompt["100.0"]) == (2.0, 3.0, 4.0)
    assert _count_and_sum(families, "request_prompt_tokens") == (4.0, 117.0)
    generation = _buckets(families, "request_generation_tokens")
    assert (generation["1.0"], generation["2.0"], generation["5.0"]) == (2.0, 3.0, 4.0)


def test_snapshot_survives_msgpack_and_pickle():
    snap = _replica_a()
    restored = msgpack.unpackb(msgpack.packb(snap))
    assert restored == snap
    assert pickle.loads(pickle.dumps(snap)) == snap
    assert render_metrics([restored]) == render_metrics([snap])


def test_models_are_aggregated_separately_and_ids_fall_back_to_position():
    first = MetricsRecorder().snapshot(_stats(num_running=1, num_prompt_tokens=3), "m1")
    second = MetricsRecorder().snapshot(_stats(num_running=4, num_prompt_tokens=5), "m2")
    families = _families(render_metrics([first, second]))
    assert families["fleetlm:num_requests_running"]["samples"] == {
        ("fleetlm:num_requests_running", (("model_name", "m1"), ("replica", "0"))): 1.0,
        ("fleetlm:num_requests_running", (("model_name", "m2"), ("replica", "1"))): 4.0,
    }
    assert families["fleetlm:prompt_tokens"]["samples"] == {
        ("fleetlm:prompt_tokens_total", (("model_name", "m1"),)): 3.0,
        ("fleetlm:prompt_tokens_total", (("model_name", "m2"),)): 5.0,
    }


def test_no_replicas_renders_parsable_empty_families():
    families = _families(render_metrics([]))
    assert "fleetlm:time_to_first_token_seconds" in families
    assert all(not family["samples"] for family in families.values())


def test_a_replica_that_did_not_answer_shows_only_as_down():
    families = _families(render_metrics([_replica_b()], missing=[(MODEL, "a")]))
    assert families["fleetlm:replica_up"]["samples"] == {
        ("fleetlm:replica_up", (("model_name", MODEL), ("replica", "a"))): 0.0,
        ("fleetlm:replica_up", (("model_name", MODEL), ("replica", "b"))): 1.0,
    }
    running = families["fleetlm:num_requests_running"]["samples"]
    assert [dict(labels)["replica"] for _, labels in running] == ["b"]
    assert families["fleetlm:prompt_tokens"]["samples"] == {
        ("fleetlm:prompt_tokens_total", (("model_name", MODEL),)): 10.0}


def test_with_every_replica_down_the_scrape_still_parses():
    families = _families(render_metrics([], missing=[(MODEL, "a"), (MODEL, "b")]))
    assert set(families["fleetlm:replica_up"]["samples"].values()) == {0.0}
    assert not families["fleetlm:prompt_tokens"]["samples"]


def test_duplicate_replica_ids_are_rejected():
    snap = MetricsRecorder(replica_id="x").snapshot(_stats(), MODEL)
    with pytest.raises(ValueError, match="repeat a replica id"):
        render_metrics([snap, dict(snap)])


def test_mismatched_buckets_are_rejected():
    short = MetricsRecorder(replica_id="s", max_model_len=10).snapshot(_stats(), MODEL)
    long = MetricsRecorder(replica_id="l", max_model_len=1000).snapshot(_stats(), MODEL)
    with pytest.raises(ValueError, match="request_prompt_tokens"):
        render_metrics([short, long])


def test_build_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(4) == (1, 2)


def test_kv_transfer_metrics_of_a_pd_deployment():
    """A prefill replica's leases, and a decode replica's loads, bytes, latency and failures
    (its engine's failed loads plus its own failed prefill calls), by cause."""
    prefill = MetricsRecorder(replica_id="prefill-0").snapshot(_stats(kv_active_leases=2), MODEL)
    latency = Histogram(TRANSFER_LATENCY_BUCKETS)
    for seconds in (0.004, 0.02, 0.02):
        latency.observe(seconds)
    decode = MetricsRecorder(replica_id="decode-0").snapshot(_stats(
        kv_transfers_done=3, kv_transfer_bytes=3 * 4096,
        kv_transfer_failures={"timeout": 1, "unreachable": 2},
        kv_transfer_latency=latency.to_dict()), MODEL)
    decode["pd"] = {"num_remote": 6, "num_local": 4,
                    "failures_by_cause": {"prefill_timeout": 1, "unreachable": 1}}
    families = _families(render_metrics([prefill, decode]))
    model = ("model_name", MODEL)

    def sample(family: str, name: str, *labels) -> float:
        return families[family]["samples"][(name, tuple(sorted([model, *labels])))]

    leases = "fleetlm:kv_transfer_active_leases"
    assert sample(leases, leases, ("replica", "prefill-0")) == 2
    assert sample(leases, leases, ("replica", "decode-0")) == 0
    assert sample("fleetlm:kv_transfers", "fleetlm:kv_transfers_total") == 3
    assert sample("fleetlm:kv_transfer_bytes", "fleetlm:kv_transfer_bytes_total") == 3 * 4096
    failures = "fleetlm:kv_transfer_failures"
    assert {cause: sample(failures, failures + "_total", ("cause", cause))
            for cause in ("timeout", "unreachable", "prefill_timeout")} == {
        "timeout": 1, "unreachable": 3, "prefill_timeout": 1}
    prefills = "fleetlm:pd_prefills"
    assert sample(prefills, prefills + "_total", ("where", "remote")) == 6
    assert sample(prefills, prefills + "_total", ("where", "local")) == 4
    histogram = "fleetlm:kv_transfer_latency_seconds"
    assert sample(histogram, histogram + "_count") == 3
    assert sample(histogram, histogram + "_bucket", ("le", "0.005")) == 1
    assert sample(histogram, histogram + "_bucket", ("le", "0.025")) == 3
