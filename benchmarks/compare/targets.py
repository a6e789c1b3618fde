"""The issue's targets for fleetlm, checked against the comparison's medians.

Output tokens/s at least 2x vLLM's at concurrency 32 and 1.5x at 8, at least 1.2x the best
of vLLM and llama.cpp at 1; median TTFT no higher than the best of the two at every
concurrency of the `random` workload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from benchmarks.compare.summary import METRICS_BY_NAME, OURS, is_ours, ratio_to_best


@dataclass(frozen=True)
class Target:
    point: str  # workload point key, e.g. "random-c32"
    metric: str  # a summary metric name
    against: str | None  # a system name, or None for the best other system
    factor: float  # fleetlm / reference must be >= factor (throughput) or <= factor (latency)

    @property
    def text(self) -> str:
        metric = METRICS_BY_NAME[self.metric]
        sign = ">=" if metric.is_higher_better else "<="
        whom = self.against or "best other"
        return f"{self.point}: {metric.label} {sign} {self.factor:g}x {whom}"


TARGETS = (
    Target("random-c32", "output_throughput", "vllm", 2.0),
    Target("random-c8", "output_throughput", "vllm", 1.5),
    Target("random-c1", "output_throughput", None, 1.2),
    Target("random-c1", "ttft_median_ms", None, 1.0),
    Target("random-c8", "ttft_median_ms", None, 1.0),
    Target("random-c32", "ttft_median_ms", None, 1.0),
)


def evaluate(target: Target, summary: Mapping, system: str = OURS) -> dict:
    """The value of `system` (fleetlm or a variant), the reference system and value, the ratio
    and whether it is met (`met` None when either side was not measured)."""
    metric = METRICS_BY_NAME[target.metric]
    systems = summary.get("points", {}).get(target.point, {}).get("systems", {})
    ours = (systems.get(system) or {}).get(target.metric)
    others = {name: s[target.metric] for name, s in systems.items()
              if not is_ours(name) and s.get(target.metric) is not None
              and (target.against is None or name == target.against)}
    row = {"target": target.text, "system": system, "ours": ours, "reference": None,
           "reference_value": None, "ratio": None, "met": None}
    if ours is None or not others:
        return row
    reference, ratio = ratio_to_best(ours, others, metric)
    row.update(reference=reference, reference_value=others[reference], ratio=ratio)
    if ratio is not None:
        row["met"] = ratio >= target.factor if metric.is_higher_better else ratio <= target.factor
    return row


def our_systems(summary: Mapping) -> list[str]:
    """fleetlm and its variants that the summary holds, first-seen order (fleetlm if none)."""
    names: list[str] = []
    for point in summary.get("points", {}).values():
        names += [n for n in point.get("systems", {}) if is_ours(n) and n not in names]
    return names or [OURS]


def evaluate_all(summary: Mapping) -> list[dict]:
    """Every target for fleetlm and for each variant of it."""
    return [evaluate(target, summary, system)
            for system in our_systems(summary) for target in TARGETS]
