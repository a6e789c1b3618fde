"""From the client's results.json files to medians over repeats and ratios fleetlm / best other.

Input: one `fleetlm bench serve` result per (system, repeat, point): its `results[0]` entry
(every client run here has exactly one load point). Output: plain dicts, ready for JSON.
A metric that a run could not measure (no successful request) is left out of its median.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

OURS = "fleetlm"  # fleetlm's name; its variants are named "fleetlm-VARIANT" (e.g. fleetlm-gguf)


def is_ours(name: str) -> bool:
    """Whether `name` is fleetlm or one of its variants (compared with the others, never with
    each other)."""
    return name == OURS or name.startswith(OURS + "-")


@dataclass(frozen=True)
class Metric:
    name: str  # key in summaries
    path: tuple[str, ...]  # where it is in a client result entry
    is_higher_better: bool
    label: str  # column heading


METRICS = (
    Metric("output_throughput", ("output_throughput",), True, "out tok/s"),
    Metric("request_throughput", ("request_throughput",), True, "req/s"),
    Metric("ttft_median_ms", ("ttft_ms", "median"), False, "TTFT med ms"),
    Metric("ttft_p99_ms", ("ttft_ms", "p99"), False, "TTFT p99 ms"),
    Metric("itl_median_ms", ("itl_ms", "median"), False, "ITL med ms"),
    Metric("itl_p99_ms", ("itl_ms", "p99"), False, "ITL p99 ms"),
    Metric("tpot_median_ms", ("tpot_ms", "median"), False, "TPOT med ms"),
)
METRICS_BY_NAME = {m.name: m for m in METRICS}
ITL_METRICS = frozenset({"itl_median_ms", "itl_p99_ms"})


def _lookup(entry: Mapping, path: Sequence[str]):
    value = entry
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def token_checks(entry: Mapping) -> dict[str, int]:
    """Exactness of one run's token accounting, from its per-request rows.

    - `num_exact`: requests with exactly `max_tokens` output tokens (EOS really ignored);
    - `num_usage_missing`: successful requests without `usage` (counts came from the tokenizer);
    - `num_usage_mismatch`: `usage.completion_tokens` != the tokenizer's count of the text;
    - `num_itl_mismatch`: requests whose ITL samples are not one per output token after the
      first (the client misread how many tokens a chunk carried).
    """
    rows = [r for r in entry.get("requests", ()) if r.get("error") is None]
    usage_pairs = [(r["usage_completion_tokens"], r["tokenizer_completion_tokens"]) for r in rows
                   if r.get("usage_completion_tokens") is not None
                   and r.get("tokenizer_completion_tokens") is not None]
    return {
        "num_requests": len(entry.get("requests", ())),
        "num_failed": len(entry.get("requests", ())) - len(rows),
        "num_exact": sum(r.get("num_output_tokens") == r.get("max_tokens") for r in rows),
        "num_usage_missing": sum(r.get("usage_completion_tokens") is None for r in rows),
        "num_usage_mismatch": sum(usage != counted for usage, counted in usage_pairs),
        "num_itl_mismatch": sum(
            len(r.get("itl_ms") or ()) != max(r.get("num_output_tokens", 0) - 1, 0) for r in rows),
    }


def summarize_run(entry: Mapping) -> dict:
    """The metrics of one client run (None where unmeasured) and its token checks."""
    summary = {m.name: _lookup(entry, m.path) for m in METRICS}
    summary["checks"] = token_checks(entry)
    return summary


def median_over_repeats(runs: Sequence[Mapping]) -> dict:
    """Median of each metric over runs (None if no run measured it); token checks are summed."""
    result: dict = {"num_runs": len(runs)}
    for metric in METRICS:
        values = [r[metric.name] for r in runs if r.get(metric.name) is not None]
        result[metric.name] = statistics.median(values) if values else None
    checks: dict[str, int] = {}
    for run in runs:
        for key, value in run["checks"].items():
            checks[key] = checks.get(key, 0) + value
    result["checks"] = checks
    result["is_itl_reliable"] = not checks.get("num_itl_mismatch")
    return result


def ratios_to_best_other(by_system: Mapping[str, Mapping], ours: str = OURS) -> dict:
    """For each metric: `ours`'s value / the best other system's value, and which system that
    is. The other systems are the reference systems: fleetlm's variants are left out.

    Best is the highest throughput or the lowest latency. So a ratio > 1 means fleetlm is ahead
    on a throughput and behind on a latency. None when fleetlm or every other system lacks it.
    ITL metrics of a system whose ITL samples were miscounted (`is_itl_reliable` False) are
    left out.
    """
    result = {}
    for metric in METRICS:
        usable = {name: s for name, s in by_system.items()
                  if metric.name not in ITL_METRICS or s.get("is_itl_reliable", True)}
        mine = (usable.get(ours) or {}).get(metric.name)
        others = {name: s[metric.name] for name, s in usable.items()
                  if not is_ours(name) and s.get(metric.name) is not None}
        if mine is None or not others:
            result[metric.name] = None
            continue
        best, ratio = ratio_to_best(mine, others, metric)
        result[metric.name] = {"ratio": ratio, "best_other": best, "best_value": others[best]}
    return result


def ratio_to_best(mine: float, others: Mapping[str, float], metric: Metric
                  ) -> tuple[str, float | None]:
    """The best of `others` for `metric` (highest throughput, lowest latency) and
    mine / its value (None when that value is 0)."""
    choose = max if metric.is_higher_better else min
    best = choose(others, key=others.get)
    return best, (mine / others[best] if others[best] else None)


def point_label(point: str) -> tuple[str, str]:
    """`random-c8` -> ("random", "8")."""
    workload, _, concurrency = point.rpartition("-c")
    return workload, concurrency


def build_summary(runs: Iterable[tuple[str, str, int, Mapping]]) -> dict:
    """`runs`: (system, point key, repeat, client result entry). Returns
    `{"points": {point: {"systems": {system: medians}, "ratios": {our system: {...}}}}}` in
    first-seen order, with ratios for fleetlm and each of its variants."""
    grouped: dict[str, dict[str, list]] = {}
    for system, point, _repeat, entry in runs:
        grouped.setdefault(point, {}).setdefault(system, []).append(summarize_run(entry))
    points = {}
    for point, systems in grouped.items():
        medians = {name: median_over_repeats(rs) for name, rs in systems.items()}
        ratios = {name: ratios_to_best_other(medians, name) for name in medians if is_ours(name)}
        points[point] = {"systems": medians, "ratios": ratios}
    return {"points": points}


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
