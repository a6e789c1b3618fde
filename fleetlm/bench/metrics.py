"""Serving metrics from raw request records: throughput, latency statistics, goodput, token checks.

Definitions (all latencies per successful request, reported in ms):
- TTFT: first chunk carrying output minus send time.
- E2EL: end of the stream minus send time.
- TPOT: (E2EL - TTFT) / (output tokens - 1); undefined for one-token outputs (vLLM bench's).
- ITL: per token, not per chunk. A chunk arriving `gap` after the previous output chunk and
  carrying k tokens adds k samples of gap / k; tokens that came with the first chunk add none
  (TTFT covers them). So the ITL samples of a request sum to last-chunk minus first-chunk time,
  and with one token per chunk this is exactly vLLM bench's per-chunk ITL.
- Output tokens: the server's `usage.completion_tokens`; without usage, the tokenizer's count of
  the text, else the number of streamed tokens. Input tokens: `usage.prompt_tokens`, else the
  workload's own count.
- Throughputs divide totals over successful requests by the run's duration (first arrival to last
  reply); goodput counts only requests within every SLO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetlm.bench.client import RequestRecord
from fleetlm.bench.runner import RunResult
from fleetlm.bench.tokenizer import BenchTokenizer

SLO_NAMES = ("ttft", "tpot", "e2el")
_MS = 1000.0
_MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Stat:
    """Summary of one latency in ms; every field None when there was no sample."""

    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of_seconds(cls, values_s: Sequence[float]) -> Stat:
        if len(values_s) == 0:
            return cls(None, None, None, None)
        values_ms = np.asarray(values_s, dtype=np.float64) * _MS
        p50, p90, p99 = np.percentile(values_ms, [50, 90, 99]).tolist()
        return cls(float(values_ms.mean()), p50, p90, p99)


@dataclass(frozen=True)
class RequestTimings:
    """Derived per-request values (seconds) of one successful request."""

    ttft_s: float
    tpot_s: float | None  # None for one-token outputs
    itls_s: tuple[float, ...]
    e2el_s: float
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class TokenAccounting:
    num_usage_missing: int  # successful requests whose stream had no usage
    num_checked: int  # requests with both usage and a tokenizer count
    num_mismatches: int  # of those, usage.completion_tokens != tokenizer count of the text
    max_abs_mismatch: int
    num_short_outputs: int  # fewer output tokens than max_tokens (EOS honoured despite ignore_eos?)


@dataclass(frozen=True)
class BenchMetrics:
    label: str
    max_concurrency: int | None
    request_rate: float | None  # None: all at once
    duration_s: float
    num_requests: int
    num_completed: int
    num_failed: int
    max_in_flight: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # (input + output) tokens/s
    goodput: float | None  # requests/s within every SLO; None without SLOs
    slos_ms: dict[str, float]
    ttft_ms: Stat
    tpot_ms: Stat
    itl_ms: Stat
    e2el_ms: Stat
    accounting: TokenAccounting
    error_samples: tuple[str, ...]


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> `{"ttft": 500.0, "tpot": 50.0}` (ms); ValueError if
    malformed."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"--goodput wants NAME:MS with NAME in {SLO_NAMES}, got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of ms") from None
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the limit must be positive")
    return slos


def attach_tokenizer_counts(records: Sequence[RequestRecord], tokenizer: BenchTokenizer) -> None:
    """Set `num_tokenizer_tokens` of every successful record (done after timing, never during)."""
    for record in records:
        if record.is_success:
            record.num_tokenizer_tokens = len(tokenizer.encode(record.text))


def request_timings(record: RequestRecord) -> RequestTimings:
    assert record.is_success and record.chunk_times, "timings need a successful stream"
    ttft = record.chunk_times[0] - record.send_time
    e2el = record.end_time - record.send_time
    num_output = _num_output_tokens(record)
    itls: list[float] = []
    for i in range(1, len(record.chunk_times)):
        num_tokens = record.chunk_num_tokens[i]
        gap = record.chunk_times[i] - record.chunk_times[i - 1]
        itls.extend([gap / num_tokens] * num_tokens)
    tpot = (e2el - ttft) / (num_output - 1) if num_output > 1 else None
    num_prompt = record.usage_prompt_tokens
    if num_prompt is None:
        num_prompt = record.num_expected_prompt_tokens
    return RequestTimings(ttft, tpot, tuple(itls), e2el, num_prompt, num_output)


def _num_output_tokens(record: RequestRecord) -> int:
    if record.usage_completion_tokens is not None:
        return record.usage_completion_tokens
    if record.num_tokenizer_tokens is not None:
        return record.num_tokenizer_tokens
    return sum(record.chunk_num_tokens)


def token_accounting(records: Sequence[RequestRecord]) -> TokenAccounting:
    done = [r for r in records if r.is_success]
    checked = [
        r.usage_completion_tokens - r.num_tokenizer_tokens
        for r in done
        if r.usage_completion_tokens is not None and r.num_tokenizer_tokens is not None
    ]
    return TokenAccounting(
        num_usage_missing=sum(r.usage_completion_tokens is None for r in done),
        num_checked=len(checked),
        num_mismatches=sum(diff != 0 for diff in checked),
        max_abs_mismatch=max((abs(diff) for diff in checked), default=0),
        num_short_outputs=sum(_num_output_tokens(r) < r.max_tokens for r in done),
    )


def is_within_slos(timings: RequestTimings, slos_ms: dict[str, float]) -> bool:
    values_s = {"ttft": timings.ttft_s, "tpot": timings.tpot_s, "e2el": timings.e2el_s}
    return all(
        values_s[name] is None or values_s[name] * _MS <= limit for name, limit in slos_ms.items()
    )


def compute_metrics(result: RunResult, slos_ms: dict[str, float] | None = None) -> BenchMetrics:
    """Metrics of one load point; call `attach_tokenizer_counts` first to check token counts."""
    slos_ms = dict(slos_ms or {})
    timings = [request_timings(r) for r in result.records if r.is_success]
    duration = result.duration_s
    total_input = sum(t.num_prompt_tokens for t in timings)
    total_output = sum(t.num_output_tokens for t in timings)
    num_good = sum(is_within_slos(t, slos_ms) for t in timings)
    errors = [r.error for r in result.records if r.error is not None]
    load = result.load
    return BenchMetrics(
        label=load.label,
        max_concurrency=load.max_concurrency,
        request_rate=load.request_rate if np.isfinite(load.request_rate) else None,
        duration_s=duration,
        num_requests=len(result.records),
        num_completed=len(timings),
        num_failed=len(result.records) - len(timings),
        max_in_flight=result.max_in_flight,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(timings) / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        goodput=num_good / duration if slos_ms else None,
        slos_ms=slos_ms,
        ttft_ms=Stat.of_seconds([t.ttft_s for t in timings]),
        tpot_ms=Stat.of_seconds([t.tpot_s for t in timings if t.tpot_s is not None]),
        itl_ms=Stat.of_seconds([itl for t in timings for itl in t.itls_s]),
        e2el_ms=Stat.of_seconds([t.e2el_s for t in timings]),
        accounting=token_accounting(result.records),
        error_samples=tuple(dict.fromkeys(errors))[:_MAX_ERROR_SAMPLES],
    )
