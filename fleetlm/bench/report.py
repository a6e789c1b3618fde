"""Benchmark results as JSON (everything, per-request values included) and a Markdown table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from fleetlm.bench.client import RequestRecord
from fleetlm.bench.metrics import BenchMetrics, Stat, request_timings
from fleetlm.bench.runner import RunResult

RESULT_SCHEMA_VERSION = 1
_MS = 1000.0


def request_row(record: RequestRecord) -> dict:
    """One request as JSON: identity, token counts, latencies in ms (None when it failed)."""
    row = {
        "conv_id": record.conv_id,
        "turn_index": record.turn_index,
        "max_tokens": record.max_tokens,
        "usage_prompt_tokens": record.usage_prompt_tokens,
        "usage_completion_tokens": record.usage_completion_tokens,
        "tokenizer_completion_tokens": record.num_tokenizer_tokens,
        "replica": record.replica,
        "error": record.error,
    }
    if not record.is_success:
        return row
    timings = request_timings(record)
    row.update(
        num_prompt_tokens=timings.num_prompt_tokens,
        num_output_tokens=timings.num_output_tokens,
        ttft_ms=timings.ttft_s * _MS,
        tpot_ms=None if timings.tpot_s is None else timings.tpot_s * _MS,
        e2el_ms=timings.e2el_s * _MS,
        itl_ms=[itl * _MS for itl in timings.itls_s],
    )
    return row


def write_json(
    path: Path, run_info: dict, results: Sequence[RunResult], metrics: Sequence[BenchMetrics]
) -> None:
    """`{"schema", "run", "results": [metrics fields + "requests": [...]]}`."""
    points = []
    for result, point in zip(results, metrics, strict=True):
        entry = asdict(point)
        entry["requests"] = [request_row(record) for record in result.records]
        points.append(entry)
    document = {"schema": RESULT_SCHEMA_VERSION, "run": run_info, "results": points}
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _stat(stat: Stat, fields: Sequence[str]) -> str:
    return " / ".join(_num(getattr(stat, name)) for name in fields)


def markdown_table(metrics: Sequence[BenchMetrics]) -> str:
    header = (
        "| load | done/all | req/s | out tok/s | total tok/s | goodput req/s "
        "| TTFT ms mean / med / p99 | TPOT ms med / p99 | ITL ms med / p99 | E2EL ms med / p99 |"
    )
    lines = [header, "|" + "---|" * 10]
    for m in metrics:
        lines.append(
            f"| {m.label} | {m.num_completed}/{m.num_requests} | {_num(m.request_throughput, 2)} "
            f"| {_num(m.output_throughput)} | {_num(m.total_token_throughput)} "
            f"| {_num(m.goodput, 2)} | {_stat(m.ttft_ms, ('mean', 'median', 'p99'))} "
            f"| {_stat(m.tpot_ms, ('median', 'p99'))} | {_stat(m.itl_ms, ('median', 'p99'))} "
            f"| {_stat(m.e2el_ms, ('median', 'p99'))} |"
        )
    return "\n".join(lines)


def accounting_table(metrics: Sequence[BenchMetrics]) -> str:
    lines = [
        "| load | no usage | checked | usage != tokenizer | max abs diff | short outputs |",
        "|" + "---|" * 6,
    ]
    for m in metrics:
        a = m.accounting
        lines.append(
            f"| {m.label} | {a.num_usage_missing} | {a.num_checked} | {a.num_mismatches} "
            f"| {a.max_abs_mismatch} | {a.num_short_outputs} |"
        )
    return "\n".join(lines)


def write_markdown(path: Path, run_info: dict, metrics: Sequence[BenchMetrics]) -> None:
    described = ", ".join(f"{key}={value}" for key, value in run_info.items() if key != "argv")
    sections = [
        "# fleetlm bench serve",
        described,
        markdown_table(metrics),
        "Token accounting (usage vs tokenizer count of the returned text):",
        accounting_table(metrics),
    ]
    errors = [f"- {m.label}: {e}" for m in metrics for e in m.error_samples]
    if errors:
        sections += ["Errors (first few per load point):", "\n".join(errors)]
    path.write_text("\n\n".join(sections) + "\n")
