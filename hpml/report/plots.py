"""Report figures: runs in, PNG files out, drawn on matplotlib's Agg canvas without touching pyplot state."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hpml.errors import UsageError
from hpml.report import stats
from hpml.report.tables import (MISSING, display_id, latest_by_variant, metric_value, metric_values, model_of,
                                seed_runs, tag_value)
from hpml.tracking import (
    M_ACCURACY, M_F1, M_MEM_ACTIVATIONS, M_MEM_GRADS, M_MEM_OPTIMIZER, M_MEM_PARAMS, M_PROBE_ALLOC,
    M_PROBE_RESERVED, M_TRAIN_RUNTIME, M_TRAIN_SPS, TAG_DEVICE, TAG_FINGERPRINT, TAG_PURPOSE,
)
from hpml.variants import variants_for

PathLike = Union[str, Path]

# File names make_plots writes; a caller compares against these to say which plots were skipped.
PLOT_FILES = {"pareto_squad": "pareto_squad.png", "pareto_sst2": "pareto_sst2.png", "vram": "vram.png",
              "throughput": "throughput.png"}

_TASK_NAMES = {"squad": "SQuAD v2", "sst2": "SST-2"}
_ACCURACY = {"squad": (M_F1, "dev-set F1 (%)"), "sst2": (M_ACCURACY, "validation accuracy (fraction)")}
_BREAKDOWN = (("parameters", M_MEM_PARAMS, "#4C72B0"), ("gradients", M_MEM_GRADS, "#DD8452"),
              ("optimizer state", M_MEM_OPTIMIZER, "#55A868"), ("activations", M_MEM_ACTIVATIONS, "#C44E52"))
_TASK_COLORS = {"squad": "#4C72B0", "sst2": "#DD8452"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: rendering needs no display and no global backend switch
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _devices_line(runs: Sequence[pd.Series]) -> str:
    """Where the numbers come from: device, and for demo/test runs their purpose, model and data, so a plot
    of a smoke run cannot be mistaken for a study result when it travels without its report."""
    devices = sorted({d for d in (tag_value(r, TAG_DEVICE) for r in runs) if d != MISSING})
    line = f"measured on {', '.join(devices)}" if devices else "device not recorded"
    purposes = sorted({p for p in (tag_value(r, TAG_PURPOSE) for r in runs) if p != MISSING})
    if purposes and purposes != ["real"]:
        models = sorted({m for m in (model_of(r) for r in runs) if m != MISSING})
        prints = sorted({f[:8] for f in (tag_value(r, TAG_FINGERPRINT) for r in runs) if f != MISSING})
        line += (f" · purpose {'/'.join(purposes)} (not study data)" + (f" · model {', '.join(models)}" if models else "")
                 + (f" · data {', '.join(prints)}" if prints else ""))
    return line


def _mean_and_half(group: Optional[pd.DataFrame], metric: str) -> tuple[Optional[float], float]:
    """A plotted value: the mean over seeds, and its 95% half-width as the error bar (0 below 2 seeds)."""
    s = stats.summarize(metric_values(group, metric))
    return s.mean, (s.half_width or 0.0)


def pareto_points(runs: pd.DataFrame, task: str) -> list[tuple[str, float, float, float, float]]:
    """(label, mean training time, mean accuracy, time half-width, accuracy half-width) per variant."""
    metric = _ACCURACY[task][0]
    groups = seed_runs(runs, task)
    points = []
    for v in variants_for(task):
        x, xerr = _mean_and_half(groups.get(v.id), M_TRAIN_RUNTIME)
        y, yerr = _mean_and_half(groups.get(v.id), metric)
        if x is not None and y is not None:
            points.append((display_id(v), x, y, xerr, yerr))
    return points


def throughput_bars(runs: pd.DataFrame) -> dict[str, list[tuple[str, float, float]]]:
    """task → (label, mean training samples/s, 95% half-width) per variant with data; tasks without none."""
    out = {}
    for task in ("squad", "sst2"):
        groups = seed_runs(runs, task)
        bars = [(display_id(v), *_mean_and_half(groups.get(v.id), M_TRAIN_SPS)) for v in variants_for(task)]
        bars = [b for b in bars if b[1] is not None]
        if bars:
            out[task] = bars
    return out


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """(label, time, accuracy) points no other point beats: none is both no slower and more accurate."""
    front: list[tuple[str, float, float]] = []
    for point in sorted(points, key=lambda p: (p[1], -p[2])):
        if not front or point[2] > front[-1][2]:
            front.append(point)
    return front


def plot_pareto(runs: pd.DataFrame, task: str, path: PathLike) -> Optional[Path]:
    """Headline accuracy vs training time, one labelled point per variant, with the Pareto front drawn."""
    if task not in _ACCURACY:
        raise UsageError(f"no Pareto plot for task {task!r}; choose from {', '.join(_ACCURACY)}")
    metric, y_label = _ACCURACY[task]
    latest = latest_by_variant(runs, task)
    full = pareto_points(runs, task)
    if not full:
        return None
    used = [r for r in latest.values()]
    points = [p[:3] for p in full]
    front = pareto_front(points)
    fig = _figure(7.5, 5.4)
    ax = fig.add_subplot()
    ax.errorbar([p[1] for p in full], [p[2] for p in full], xerr=[p[3] for p in full], yerr=[p[4] for p in full],
                fmt="o", markersize=6, color="#4C72B0", ecolor="#4C72B0", elinewidth=1, capsize=3, zorder=3,
                label="variant (mean over seeds, bars: 95% CI)")
    # A staircase: the best accuracy reachable within each training-time budget.
    ax.step([p[1] for p in front], [p[2] for p in front], where="post", color="#C44E52", linewidth=1.5,
            zorder=2, label="Pareto front (no variant is both faster and more accurate)")
    ax.scatter([p[1] for p in front], [p[2] for p in front], s=90, facecolors="none", edgecolors="#C44E52",
               zorder=4)
    for label, x, y in points:
        ax.annotate(label, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=9)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(y_label)
    ax.set_title(f"{_TASK_NAMES[task]}: accuracy vs training time\n{_devices_line(used)}", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12, y=0.12)  # room for the labels of the outermost points
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_vram(runs: pd.DataFrame, path: PathLike) -> Optional[Path]:
    """Probe VRAM per variant: stacked by component where the probe logged a split, else the plain peak."""
    probes = latest_by_variant(runs, "vram")
    rows = []
    for v in variants_for():
        run = probes.get(v.id)
        parts = {name: metric_value(run, metric) for name, metric, _ in _BREAKDOWN}
        peak, reserved = metric_value(run, M_PROBE_ALLOC), metric_value(run, M_PROBE_RESERVED)
        if peak is not None or any(x is not None for x in parts.values()):
            rows.append((display_id(v), run, peak, reserved, parts))
    if not rows:
        return None
    fig = _figure(max(6.5, 1.1 * len(rows) + 4.5), 5.0)  # + room for the legend
    ax = fig.add_subplot()
    labelled: set[str] = set()

    def once(name: str) -> str:
        # Each legend entry once, however many bars draw it.
        if name in labelled:
            return "_nolegend_"
        labelled.add(name)
        return name

    for i, (_, _, peak, reserved, parts) in enumerate(rows):
        if any(x is not None for x in parts.values()):
            bottom = 0.0
            for name, _, color in _BREAKDOWN:
                height = parts[name] or 0.0
                ax.bar(i, height, bottom=bottom, width=0.6, color=color, label=once(name))
                bottom += height
        else:
            ax.bar(i, peak, width=0.6, color="#8C8C8C", label=once("peak allocated (no split logged)"))
        if peak is not None:
            ax.hlines(peak, i - 0.32, i + 0.32, colors="black", linewidth=2.5, label=once("peak allocated"))
            # the value sits above the bar's left half; the reserved marker takes the right half
            ax.annotate(f"{peak:.0f} MiB", (i - 0.3, peak), xytext=(0, 3), textcoords="offset points",
                        ha="left", va="bottom", fontsize=8)
        if reserved is not None:
            ax.plot(i + 0.18, reserved, marker="v", markersize=7, color="black", markerfacecolor="none",
                    label=once("peak reserved"), linestyle="none")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("variant")
    ax.set_ylabel("GPU memory (MiB)")
    ax.set_title(f"Training-step VRAM per variant (VRAM probe)\n{_devices_line([r[1] for r in rows])}",
                 fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.15)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    return _save(fig, path)


def plot_throughput(runs: pd.DataFrame, path: PathLike) -> Optional[Path]:
    """Training throughput per variant, mean over seeds with 95% error bars: one panel per task, because a
    SQuAD feature (a 384-token window) and an SST-2 sentence are different units and share no axis."""
    bars = throughput_bars(runs)
    if not bars:
        return None
    used = [r for task in bars for r in latest_by_variant(runs, task).values()]
    fig = _figure(max(6.5, 0.75 * sum(len(b) for b in bars.values()) + 2.5 * len(bars)), 4.8)
    axes = fig.subplots(1, len(bars), squeeze=False)[0]
    for ax, (task, group) in zip(axes, bars.items()):
        unit = "features/s" if task == "squad" else "sentences/s"
        drawn = ax.bar(range(len(group)), [b[1] for b in group], yerr=[b[2] for b in group], width=0.7,
                       color=_TASK_COLORS[task], capsize=3, error_kw={"elinewidth": 1})
        ax.bar_label(drawn, fmt="%.0f", fontsize=8, padding=2)
        ax.set_xticks(range(len(group)), [b[0] for b in group])
        ax.set_xlabel("variant")
        ax.set_ylabel(f"training {unit}")
        ax.set_title(f"{_TASK_NAMES[task]} ({unit})", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.margins(y=0.12)
    fig.suptitle(f"Training throughput per variant (mean over seeds, bars: 95% CI)\n{_devices_line(used)}",
                 fontsize=11)
    return _save(fig, path)


def make_plots(runs: pd.DataFrame, out_dir: PathLike) -> list[Path]:
    """Every plot that has data, written under out_dir; a plot without data is skipped (see PLOT_FILES)."""
    out = Path(out_dir)
    made = [
        plot_pareto(runs, "squad", out / PLOT_FILES["pareto_squad"]),
        plot_pareto(runs, "sst2", out / PLOT_FILES["pareto_sst2"]),
        plot_vram(runs, out / PLOT_FILES["vram"]),
        plot_throughput(runs, out / PLOT_FILES["throughput"]),
    ]
    return [p for p in made if p is not None]
