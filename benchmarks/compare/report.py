"""The comparison as Markdown: results per point and system, fleetlm / best other, the systems.

Every number is a median over repeats (per-run values are in the JSON and the raw folders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from benchmarks.compare.summary import METRICS, METRICS_BY_NAME, median_or_none, point_label
from benchmarks.compare.targets import evaluate_all, our_systems

_MIB = 1024 * 1024
RESULT_COLUMNS = ("output_throughput", "request_throughput", "ttft_median_ms", "ttft_p99_ms",
                  "itl_median_ms", "itl_p99_ms")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: Sequence[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def _checks_cell(checks: Mapping[str, int]) -> str:
    """`64/64 exact` plus what went wrong, if anything."""
    done = checks.get("num_requests", 0) - checks.get("num_failed", 0)
    text = f"{checks.get('num_exact', 0)}/{checks.get('num_requests', 0)} exact"
    notes = []
    if checks.get("num_failed"):
        notes.append(f"{checks['num_failed']} failed")
    if checks.get("num_usage_missing"):
        notes.append(f"{checks['num_usage_missing']}/{done} no usage")
    if checks.get("num_usage_mismatch"):
        notes.append(f"{checks['num_usage_mismatch']} usage != tokenizer")
    if checks.get("num_itl_mismatch"):
        notes.append(f"{checks['num_itl_mismatch']} ITL count off")
    return text + (f" ({', '.join(notes)})" if notes else "")


def results_table(summary: Mapping) -> str:
    labels = [METRICS_BY_NAME[name].label for name in RESULT_COLUMNS]
    lines = _header(["workload", "C", "system", *labels, "runs", "output tokens"])
    for point, data in summary["points"].items():
        workload, concurrency = point_label(point)
        for system, medians in data["systems"].items():
            digits = [2 if name == "request_throughput" else 1 for name in RESULT_COLUMNS]
            values = [_num(medians[name], d) for name, d in zip(RESULT_COLUMNS, digits)]
            lines.append(_row([workload, concurrency, system, *values,
                               str(medians["num_runs"]), _checks_cell(medians["checks"])]))
    return "\n".join(lines)


def ratio_table(summary: Mapping) -> str:
    lines = _header(["workload", "C", "system",
                     *(METRICS_BY_NAME[n].label for n in RESULT_COLUMNS)])
    for point, data in summary["points"].items():
        for system in our_systems(summary):
            ratios = data["ratios"].get(system, {})
            cells = []
            for name in RESULT_COLUMNS:
                ratio = ratios.get(name)
                cells.append("-" if ratio is None or ratio["ratio"] is None
                             else f"{ratio['ratio']:.2f}x ({ratio['best_other']})")
            lines.append(_row([*point_label(point), system, *cells]))
    return "\n".join(lines)


def targets_table(summary: Mapping) -> str:
    lines = _header(["target", "system", "value", "reference", "ratio", "met"])
    for row in evaluate_all(summary):
        reference = ("-" if row["reference"] is None
                     else f"{row['reference']} {_num(row['reference_value'])}")
        met = {True: "yes", False: "no", None: "not measured"}[row["met"]]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(_row([row["target"], row["system"], _num(row["ours"]), reference, ratio,
                           met]))
    return "\n".join(lines)


def _mib(sample: Mapping | None, key: str) -> float | None:
    return None if not sample else sample[key] / _MIB


def systems_table(systems: Sequence[Mapping]) -> str:
    lines = _header(["system", "version", "install s", "start-up s (median, runs)",
                     "RSS after warm-up MiB", "RSS at end MiB", "PSS at end MiB", "errors"])
    for info in systems:
        sessions = [s for s in info.get("sessions", ()) if s.get("startup_s") is not None]
        startup = median_or_none(s["startup_s"] for s in sessions)
        warm_rss = median_or_none(_mib(s.get("memory_after_warmup"), "rss_bytes") for s in sessions)
        end_rss = median_or_none(_mib(s.get("memory_end"), "rss_bytes") for s in sessions)
        end_pss = median_or_none(_mib(s.get("memory_end"), "pss_bytes") for s in sessions)
        errors = [info["install_error"]] if info.get("install_error") else []
        errors += [s["error"] for s in info.get("sessions", ()) if s.get("error")]
        version = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
        lines.append(_row([info["name"], version or "-", _num(info.get("install_s"), 0),
                           f"{_num(startup)} ({len(sessions)})", _num(warm_rss, 0),
                           _num(end_rss, 0), _num(end_pss, 0),
                           "; ".join(e.splitlines()[0][:120] for e in errors) or "-"]))
    return "\n".join(lines)


def settings_list(systems: Sequence[Mapping]) -> str:
    lines = []
    for info in systems:
        for line in info.get("settings", ()):
            lines.append(f"- {info['name']}: {line}")
    return "\n".join(lines) or "-"


def render(summary: Mapping, systems: Sequence[Mapping], run_info: Mapping) -> str:
    described = ", ".join(f"{k}={v}" for k, v in run_info.items())
    metric_notes = ", ".join(f"{m.label}: {'higher' if m.is_higher_better else 'lower'} is better"
                             for m in METRICS if m.name in RESULT_COLUMNS)
    sections = [
        "# fleetlm vs vLLM (CPU) vs llama.cpp",
        described,
        "## Results (median over repeats)",
        results_table(summary),
        "## fleetlm / best other system",
        (f"Ratio of fleetlm's median (and each fleetlm variant's) to the best reference "
         f"system's median ({metric_notes}). "
         "ITL of a system whose ITL samples were miscounted (\"ITL count off\") is left out."),
        ratio_table(summary),
        "## The issue's targets",
        targets_table(summary),
        "## Systems",
        systems_table(systems),
        "Settings:",
        settings_list(systems),
    ]
    return "\n\n".join(sections) + "\n"
