"""PNG plots of a sweep: latency against throughput, and TTFT / ITL distributions (CDFs).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so no global backend state is
touched and nothing needs a display. matplotlib is imported on first use: it takes a second, which
`--help` and the tests of the other modules should not pay.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fleetlm.bench.metrics import BenchMetrics, request_timings
from fleetlm.bench.runner import RunResult

PLOT_FILES = ("latency_throughput.png", "ttft_distribution.png", "itl_distribution.png")
_MS = 1000.0
_DPI = 120
_FIGSIZE = (11.0, 4.5)


def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=_DPI)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).print_png(str(path))


def _short_labels(metrics: Sequence[BenchMetrics]) -> list[str]:
    """The swept value of each point ("c=8" or "r=4/s"), short enough to annotate a curve."""
    if len({m.max_concurrency for m in metrics}) > 1:
        return [f"c={m.max_concurrency}" for m in metrics]
    if len({m.request_rate for m in metrics}) > 1:
        return [
            "r=inf" if m.request_rate is None else f"r={m.request_rate:g}/s" for m in metrics
        ]
    return ["" for _ in metrics]


def _latency_throughput(metrics: Sequence[BenchMetrics], path: Path) -> None:
    fig = _figure(_FIGSIZE)
    throughput = [m.output_throughput for m in metrics]
    panels = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"))
    for index, (title, field) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), index)
        for percentile, style in (("median", "o-"), ("p99", "s--")):
            values = [getattr(getattr(m, field), percentile) for m in metrics]
            ax.plot(throughput, [np.nan if v is None else v for v in values], style,
                    label=percentile)
        for label, x, m in zip(_short_labels(metrics), throughput, metrics):
            y = getattr(m, field).median
            if y is not None:
                ax.annotate(label, (x, y), fontsize=7, textcoords="offset points",
                            xytext=(3, 3))
        ax.set(title=f"{title} vs throughput", xlabel="output tokens/s", ylabel=f"{title} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _cdf(values_ms: Sequence[Sequence[float]], labels: Sequence[str], title: str, path: Path):
    fig = _figure((_FIGSIZE[0] / 2, _FIGSIZE[1]))
    ax = fig.add_subplot(1, 1, 1)
    for values, label in zip(values_ms, labels):
        if len(values) == 0:
            continue
        ordered = np.sort(np.asarray(values))
        ax.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=label)
    ax.set(title=f"{title} distribution", xlabel=f"{title} (ms)", ylabel="fraction of samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def write_plots(
    result_dir: Path, results: Sequence[RunResult], metrics: Sequence[BenchMetrics]
) -> list[Path]:
    """Write the three PNG files of `PLOT_FILES` into `result_dir`; returns their paths."""
    paths = [result_dir / name for name in PLOT_FILES]
    timings = [[request_timings(r) for r in res.records if r.is_success] for res in results]
    labels = [m.label for m in metrics]
    _latency_throughput(metrics, paths[0])
    _cdf([[t.ttft_s * _MS for t in point] for point in timings], labels, "TTFT", paths[1])
    _cdf([[i * _MS for t in point for i in t.itls_s] for point in timings], labels, "ITL", paths[2])
    return paths
