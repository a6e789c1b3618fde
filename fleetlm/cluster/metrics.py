"""Prometheus metrics: recorded inside each engine replica, rendered by the ingress.

Each replica owns a `MetricsRecorder` that the serving path feeds with cheap calls (a bisect
and an increment). The ingress asks every replica for `snapshot(...)` — a plain dict of
numbers that pickles and msgpacks — and `render_metrics` turns the list into Prometheus text
with vLLM's metric names under a `fleetlm:` prefix and vLLM's histogram buckets.

Aggregation over replicas, per `model_name`:
- counters and histograms are summed (one series per model; a restarted replica starts its
  counters from zero again, which Prometheus's `rate()` treats as a counter reset);
- gauges (`num_requests_running`, `num_requests_waiting`, `kv_cache_usage_perc`) stay one
  series per replica, labelled `replica`, since a sum of cache fractions means nothing; use
  `sum by (model_name)` for totals.

A replica that does not answer (dead, being replaced, too slow) is left out of the sums, and
`fleetlm:replica_up` says so: 1 per replica that answered this scrape, 0 per one that did not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from fleetlm.executor.protocol import EngineStats
from fleetlm.executor.transfer_stats import TRANSFER_LATENCY_BUCKETS, Histogram

# The classic text exposition format, which every Prometheus version scrapes.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "fleetlm:"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so dashboards carry over.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Upper end of the token-count buckets when the recorder is not told the context length.
DEFAULT_MAX_TOKENS_BUCKET = 1 << 17

# (name after the prefix, help text)
GAUGES = (
    ("num_requests_running", "Number of requests in model execution batches."),
    ("num_requests_waiting", "Number of requests waiting to be processed."),
    ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    ("kv_transfer_active_leases", ("Finished prompts whose KV blocks a prefill replica holds "
                                   "for a decode replica to read.")),
)
COUNTERS = (
    ("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    ("num_preemptions", "Cumulative number of preemption from the engine."),
    ("prompt_tokens", "Number of prefill tokens processed."),
    ("generation_tokens", "Number of generation tokens processed."),
    ("spec_decode_num_drafts", "Number of spec decoding drafts (steps that verified drafts)."),
    ("spec_decode_num_draft_tokens", "Number of draft tokens."),
    ("spec_decode_num_accepted_tokens", "Number of accepted tokens."),
    ("kv_transfers", "Prompts whose KV a decode replica read from a prefill replica."),
    ("kv_transfer_bytes", "Bytes of KV a decode replica read from prefill replicas."),
)
KV_TRANSFER_FAILURES_HELP = ("Prompts whose KV could not be computed elsewhere or read, by "
                             "cause; each was recomputed or failed (kv_transfer.failure_policy).")
PD_PREFILLS_HELP = ("Prompts of a P/D deployment by where they were prefilled: remote (the "
                    "prefill pool) or local (the decode replica: short or cached).")
ACCEPTED_PER_POSITION_HELP = "Accepted tokens per draft position."
ROUTER_DECISIONS_HELP = ("Routing decisions by stage (a scorer: best, overruled or even; the "
                         "affinity filter: stuck, spilled, placed by room or none) and outcome.")
HISTOGRAMS = (
    ("time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("request_prompt_tokens", "Number of prefill tokens processed, per finished request."),
    ("request_generation_tokens", "Number of generation tokens processed, per finished request."),
    ("kv_transfer_latency_seconds", ("Histogram of the time from a decode replica's admission "
                                     "of a prompt to its KV having arrived.")),
)
REQUEST_SUCCESS_HELP = "Count of successfully processed requests."
REPLICA_UP_HELP = ("1 if the replica answered this scrape, 0 if not (dead, being replaced or "
                   "too slow: its series are left out of this scrape).")


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including `max_value` (vLLM's token buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class MetricsRecorder:
    """Request-level metrics of one engine replica.

    Not thread-safe: call it from the replica's event loop only. Timings are in seconds.
    `replica_id` labels this replica's gauges (the ingress falls back to the position in its
    list when empty); `max_model_len` bounds the token-count histograms' buckets.
    """

    def __init__(self, replica_id: str = "", max_model_len: int | None = None):
        token_buckets = build_1_2_5_buckets(max_model_len or DEFAULT_MAX_TOKENS_BUCKET)
        self.replica_id = replica_id
        self.num_finished_by_reason: dict[str, int] = {}
        self.histograms = {
            "time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
            "inter_token_latency_seconds": Histogram(INTER_TOKEN_BUCKETS),
            "e2e_request_latency_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_prompt_tokens": Histogram(token_buckets),
            "request_generation_tokens": Histogram(token_buckets),
        }

    def on_first_token(self, seconds_since_arrival: float) -> None:
        self.histograms["time_to_first_token_seconds"].observe(seconds_since_arrival)

    def on_token(self, inter_token_seconds: float) -> None:
        """One output token after the first; the gap since the previous one."""
        self.histograms["inter_token_latency_seconds"].observe(inter_token_seconds)

    def on_finish(
        self,
        e2e_seconds: float,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        finish_reason: str,
    ) -> None:
        """A request ended: "stop", "length" or "abort" (all counted, as vLLM does)."""
        self.histograms["e2e_request_latency_seconds"].observe(e2e_seconds)
        self.histograms["request_prompt_tokens"].observe(num_prompt_tokens)
        self.histograms["request_generation_tokens"].observe(num_generation_tokens)
        num_finished = self.num_finished_by_reason.get(finish_reason, 0)
        self.num_finished_by_reason[finish_reason] = num_finished + 1

    def snapshot(self, engine_stats: EngineStats, model_name: str) -> dict[str, Any]:
        """Everything `render_metrics` needs, as a dict of plain numbers, lists and strings."""
        return {
            "model_name": model_name,
            "replica_id": self.replica_id,
            "gauges": {
                "num_requests_running": engine_stats.num_running,
                "num_requests_waiting": engine_stats.num_waiting,
                "kv_cache_usage_perc": engine_stats.kv_cache_usage,
                "kv_transfer_active_leases": engine_stats.kv_active_leases,
            },
            "counters": {
                "prefix_cache_queries": engine_stats.prefix_cache_queries,
                "prefix_cache_hits": engine_stats.prefix_cache_hits,
                "num_preemptions": engine_stats.num_preemptions,
                "prompt_tokens": engine_stats.num_prompt_tokens,
                "generation_tokens": engine_stats.num_generation_tokens,
                "spec_decode_num_drafts": engine_stats.spec_num_drafts,
                "spec_decode_num_draft_tokens": engine_stats.spec_num_draft_tokens,
                "spec_decode_num_accepted_tokens": engine_stats.spec_num_accepted_tokens,
                "kv_transfers": engine_stats.kv_transfers_done,
                "kv_transfer_bytes": engine_stats.kv_transfer_bytes,
            },
            "kv_transfer_failures": dict(engine_stats.kv_transfer_failures),
            "accepted_per_position": list(engine_stats.spec_accepted_per_position),
            "request_success": dict(self.num_finished_by_reason),
            "histograms": {
                **{name: h.to_dict() for name, h in self.histograms.items()},
                "kv_transfer_latency_seconds": engine_stats.kv_transfer_latency
                or Histogram(TRANSFER_LATENCY_BUCKETS).to_dict(),
            },
        }


def render_metrics(snapshots: Sequence[dict[str, Any]],
                   missing: Sequence[tuple[str, str]] = (),
                   routers: Sequence[tuple[str, dict[str, dict[str, int]]]] = ()) -> str:
    """Prometheus text (`METRICS_CONTENT_TYPE`) for the replicas' snapshots.

    `missing`: (model name, replica) of each replica that did not answer; it shows only as
    `fleetlm:replica_up 0`. `routers`: (model name, `Router.snapshot()`) of the ingress's
    routers, rendered as `fleetlm:router_decisions`. Raises `ValueError` if two replicas
    carry the same id or if replicas of one model disagree on a histogram's buckets.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshots, missing))
    if routers:
        registry.register(_RouterCollector(routers))
    return generate_latest(registry).decode("utf-8")


class _RouterCollector:
    """The routing decisions per scorer or filter (`stage`) and outcome, summed per model."""

    def __init__(self, routers: Sequence[tuple[str, dict[str, dict[str, int]]]]):
        self.routers = routers

    def collect(self) -> Iterator[Metric]:
        totals: dict[tuple[str, str, str], int] = {}
        for model, outcomes in self.routers:
            for stage, counts in outcomes.items():
                for outcome, num in counts.items():
                    key = (model, stage, outcome)
                    totals[key] = totals.get(key, 0) + num
        family = CounterMetricFamily(PREFIX + "router_decisions", ROUTER_DECISIONS_HELP,
                                     labels=["model_name", "stage", "outcome"])
        for key in sorted(totals):
            family.add_metric(list(key), totals[key])
        yield family


class _SnapshotCollector:
    """A custom collector over fixed snapshots, registered in a fresh registry per render."""

    def __init__(self, snapshots: Sequence[dict[str, Any]],
                 missing: Sequence[tuple[str, str]] = ()):
        self.replica_ids = _replica_ids(snapshots, [replica for _, replica in missing])
        self.missing = missing
        self.by_model: dict[str, list[dict[str, Any]]] = {}
        for snap in snapshots:
            self.by_model.setdefault(snap["model_name"], []).append(snap)

    def collect(self) -> Iterator[Metric]:
        yield self._replica_up()
        yield from self._gauges()
        yield from self._counters()
        yield self._accepted_per_position()
        yield self._labelled_counter("request_success", REQUEST_SUCCESS_HELP, "finished_reason",
                                     lambda snap: snap["request_success"])
        yield self._labelled_counter("kv_transfer_failures", KV_TRANSFER_FAILURES_HELP, "cause",
                                     _transfer_failures)
        yield self._labelled_counter("pd_prefills", PD_PREFILLS_HELP, "where", _pd_prefills)
        yield from self._histograms()

    def _replica_up(self) -> Metric:
        family = GaugeMetricFamily(PREFIX + "replica_up", REPLICA_UP_HELP,
                                   labels=["model_name", "replica"])
        for model, snaps in self.by_model.items():
            for snap in snaps:
                family.add_metric([model, self.replica_ids[id(snap)]], 1)
        for model, replica in self.missing:
            family.add_metric([model, replica], 0)
        return family

    def _gauges(self) -> Iterator[Metric]:
        for name, doc in GAUGES:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", "replica"])
            for model, snaps in self.by_model.items():
                for snap in snaps:
                    family.add_metric([model, self.replica_ids[id(snap)]], snap["gauges"][name])
            yield family

    def _counters(self) -> Iterator[Metric]:
        for name, doc in COUNTERS:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            for model, snaps in self.by_model.items():
                family.add_metric([model], sum(snap["counters"][name] for snap in snaps))
            yield family

    def _accepted_per_position(self) -> Metric:
        name = PREFIX + "spec_decode_num_accepted_tokens_per_pos"
        family = CounterMetricFamily(name, ACCEPTED_PER_POSITION_HELP,
                                     labels=["model_name", "position"])
        for model, snaps in self.by_model.items():
            totals: list[int] = []
            for snap in snaps:
                for position, num in enumerate(snap.get("accepted_per_position", ())):
                    totals.extend([0] * (position + 1 - len(totals)))
                    totals[position] += num
            for position, num in enumerate(totals):
                family.add_metric([model, str(position)], num)
        return family

    def _labelled_counter(self, name: str, doc: str, label: str,
                          counts_of: Callable[[dict[str, Any]], dict[str, int]]) -> Metric:
        """One counter series per model and label value, summed over the replicas."""
        family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", label])
        for model, snaps in self.by_model.items():
            totals: dict[str, int] = {}
            for snap in snaps:
                for value, num in counts_of(snap).items():
                    totals[value] = totals.get(value, 0) + num
            for value in sorted(totals):
                family.add_metric([model, value], totals[value])
        return family

    def _histograms(self) -> Iterator[Metric]:
        for name, doc in HISTOGRAMS:
            family = HistogramMetricFamily(PREFIX + name, doc, labels=["model_name"])
            for model, snaps in self.by_model.items():
                merged = _merge_histograms([snap["histograms"][name] for snap in snaps], name)
                family.add_metric([model], _cumulative_buckets(merged), merged["sum"])
            yield family


def _transfer_failures(snap: dict[str, Any]) -> dict[str, int]:
    """The engine's failed loads and, on a decode replica, its failed prefill calls."""
    failures = dict(snap.get("kv_transfer_failures", {}))
    for cause, num in snap.get("pd", {}).get("failures_by_cause", {}).items():
        failures[cause] = failures.get(cause, 0) + num
    return failures


def _pd_prefills(snap: dict[str, Any]) -> dict[str, int]:
    pd = snap.get("pd")
    return {"remote": pd["num_remote"], "local": pd["num_local"]} if pd else {}


def _replica_ids(snapshots: Sequence[dict[str, Any]], missing: Sequence[str]) -> dict[int, str]:
    """id(snapshot) -> replica label; an empty replica id becomes the list position."""
    labels = {id(snap): snap["replica_id"] or str(i) for i, snap in enumerate(snapshots)}
    every = [*labels.values(), *missing]
    if len(set(every)) != len(every):
        raise ValueError(f"metrics snapshots repeat a replica id: {sorted(every)}")
    return labels


def _merge_histograms(histograms: list[dict[str, Any]], name: str) -> dict[str, Any]:
    bounds = histograms[0]["bounds"]
    counts = [0] * len(histograms[0]["counts"])
    total = 0.0
    for hist in histograms:
        if hist["bounds"] != bounds:
            raise ValueError(f"replicas disagree on the buckets of {PREFIX}{name}")
        counts = [a + b for a, b in zip(counts, hist["counts"], strict=True)]
        total += hist["sum"]
    return {"bounds": bounds, "counts": counts, "sum": total}


def _cumulative_buckets(hist: dict[str, Any]) -> list[tuple[str, float]]:
    """(le, count of observations <= le) pairs, ending with +Inf, as Prometheus expects."""
    les = [floatToGoString(b) for b in hist["bounds"]] + ["+Inf"]
    buckets, running = [], 0
    for le, num in zip(les, hist["counts"], strict=True):
        running += num
        buckets.append((le, running))
    return buckets
