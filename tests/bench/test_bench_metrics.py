"""Metrics from hand-built records: exact TTFT, TPOT, ITL, percentiles, throughput and goodput."""

from __future__ import annotations

import pytest

from fleetlm.bench.client import RequestRecord
from fleetlm.bench.metrics import Stat, compute_metrics, parse_slos, request_timings
from fleetlm.bench.runner import LoadPoint, RunResult


def _record(send, chunks, num_tokens, end, usage_prompt, usage_completion, max_tokens=4):
    return RequestRecord(
        conv_id="c", turn_index=0, max_tokens=max_tokens, num_expected_prompt_tokens=99,
        send_time=send, end_time=end, chunk_times=list(chunks), chunk_num_tokens=list(num_tokens),
        usage_prompt_tokens=usage_prompt, usage_completion_tokens=usage_completion,
    )


# TTFT 0.1 s, E2EL 0.26 s, 4 tokens: the last chunk carries 2 tokens, 0.1 s after the previous.
FOUR_TOKENS = _record(0.0, [0.1, 0.15, 0.25], [1, 1, 2], 0.26, 10, 4)
# TTFT 0.3 s, a single token: no TPOT, no ITL.
ONE_TOKEN = _record(1.0, [1.3], [1], 1.31, 3, 1)
FAILED = RequestRecord("c", 1, 4, 5, send_time=2.0, end_time=2.1, error="HTTP 500: boom")


def test_request_timings_follow_the_documented_definitions():
    timings = request_timings(FOUR_TOKENS)
    assert timings.ttft_s == pytest.approx(0.1)
    assert timings.e2el_s == pytest.approx(0.26)
    assert timings.tpot_s == pytest.approx((0.26 - 0.1) / 3)
    assert timings.itls_s == pytest.approx((0.05, 0.05, 0.05))  # 0.05, then 0.1 s over 2 tokens
    assert (timings.num_prompt_tokens, timings.num_output_tokens) == (10, 4)
    single = request_timings(ONE_TOKEN)
    assert single.tpot_s is None and single.itls_s == ()


def test_stat_percentiles_are_linear_interpolations_in_ms():
    stat = Stat.of_seconds([0.1, 0.3])
    assert stat.mean == pytest.approx(200.0)
    assert stat.median == pytest.approx(200.0)
    assert stat.p90 == pytest.approx(280.0)
    assert stat.p99 == pytest.approx(298.0)
    assert Stat.of_seconds([]) == Stat(None, None, None, None)


def test_throughput_and_goodput():
    result = RunResult(LoadPoint(max_concurrency=2), [FOUR_TOKENS, ONE_TOKEN, FAILED], 2.0, 2)
    metrics = compute_metrics(result, {"ttft": 150.0})
    assert (metrics.num_requests, metrics.num_completed, metrics.num_failed) == (3, 2, 1)
    assert metrics.total_input_tokens == 13 and metrics.total_output_tokens == 5
    assert metrics.request_throughput == pytest.approx(1.0)
    assert metrics.output_throughput == pytest.approx(2.5)
    assert metrics.total_token_throughput == pytest.approx(9.0)
    assert metrics.goodput == pytest.approx(0.5)  # only FOUR_TOKENS has TTFT <= 150 ms
    assert metrics.ttft_ms.mean == pytest.approx(200.0)
    assert metrics.tpot_ms.median == pytest.approx(1000 * 0.16 / 3)
    assert metrics.itl_ms.median == pytest.approx(50.0)
    assert metrics.error_samples == ("HTTP 500: boom",)
    assert metrics.accounting.num_short_outputs == 1  # ONE_TOKEN stopped before max_tokens
    # TPOT 53.3 ms misses 50 ms; a one-token request has no TPOT and passes that SLO.
    tight = compute_metrics(result, {"tpot": 50.0})
    assert tight.goodput == pytest.approx(0.5)
    assert compute_metrics(result).goodput is None


def test_expected_prompt_tokens_stand_in_for_missing_usage():
    record = _record(0.0, [0.1, 0.2], [1, 1], 0.2, None, None)
    timings = request_timings(record)
    assert timings.num_prompt_tokens == 99 and timings.num_output_tokens == 2


def test_slos_parse_and_reject_bad_input():
    assert parse_slos(["ttft:500", "tpot:50", "e2el:2000.5"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    for bad in (["ttft500"], ["itl:5"], ["ttft:fast"], ["tpot:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_slos(bad)
