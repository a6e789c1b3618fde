"""One PNG of the comparison: output tokens/s, median TTFT and median ITL against concurrency
for the `random` workload, one line per system, and `shared-prefix` as bars.

Drawn on matplotlib's Agg canvas (no pyplot, no display), as `fleetlm.bench.plots` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from benchmarks.compare.summary import point_label

PLOT_FILE = "compare.png"
_PANELS = (("output_throughput", "output tokens/s", False),
           ("ttft_median_ms", "median TTFT (ms)", True),
           ("itl_median_ms", "median ITL (ms)", True))


def _random_points(summary: Mapping) -> list[tuple[int, Mapping]]:
    points = []
    for key, data in summary.get("points", {}).items():
        workload, concurrency = point_label(key)
        if workload == "random" and concurrency.isdigit():
            points.append((int(concurrency), data["systems"]))
    return sorted(points, key=lambda p: p[0])


def write_plot(summary: Mapping, out_dir: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16.0, 4.2), dpi=110)
    axes = fig.subplots(1, 4)
    random_points = _random_points(summary)
    systems = sorted({name for data in summary.get("points", {}).values()
                      for name in data["systems"]})
    colors = {name: f"C{i}" for i, name in enumerate(systems)}
    concurrencies = [c for c, _ in random_points]
    for ax, (metric, label, log_scale) in zip(axes, _PANELS):
        num_values = 0
        for system in systems:
            xs = [c for c, s in random_points if (s.get(system) or {}).get(metric) is not None]
            ys = [s[system][metric] for c, s in random_points if c in xs]
            ax.plot(xs, ys, marker="o", label=system, color=colors[system])
            num_values += len(ys)
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        if log_scale and num_values:  # an empty log axis cannot be drawn
            ax.set_yscale("log")
        ax.set_xlabel("concurrency (random 256 in / 128 out)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    shared = {key: data["systems"] for key, data in summary.get("points", {}).items()
              if key.startswith("shared-prefix")}
    ax = axes[3]
    for key, by_system in shared.items():
        names = sorted(by_system)
        values = [by_system[n].get("output_throughput") or 0.0 for n in names]
        bars = ax.bar(names, values, color=[colors[n] for n in names])
        for bar, name in zip(bars, names):
            ttft = by_system[name].get("ttft_median_ms")
            if ttft is not None:
                ax.annotate(f"TTFT {ttft:.0f} ms", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{key}: output tokens/s")
    fig.tight_layout()
    path = out_dir / PLOT_FILE
    FigureCanvasAgg(fig).print_png(str(path))
    return path
