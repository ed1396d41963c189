"""Report plots: each is a real, readable PNG when its data exist, and is skipped (None) when they do not."""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from hpml.errors import UsageError
from hpml.report.plots import PLOT_FILES, make_plots, pareto_front, plot_pareto, plot_throughput, plot_vram
from hpml.tracking import (
    M_ACCURACY, M_DEVICE_TOTAL, M_EXACT, M_F1, M_MEM_ACTIVATIONS, M_MEM_GRADS, M_MEM_OPTIMIZER, M_MEM_PARAMS,
    M_PROBE_ALLOC, M_PROBE_RESERVED, M_TRAIN_RUNTIME, M_TRAIN_SPS, TAG_DEVICE, TAG_PURPOSE, TAG_TASK,
    TAG_VARIANT,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = pd.Timestamp("2025-03-01 12:00", tz="UTC")


def run(run_id, task, variant, minute, metrics, status="FINISHED"):
    """One row shaped like mlflow.search_runs(output_format='pandas')."""
    row = {"run_id": run_id, "experiment_id": "1", "status": status,
           "start_time": T0 + pd.Timedelta(minutes=minute), f"tags.{TAG_TASK}": task,
           f"tags.{TAG_VARIANT}": variant, f"tags.{TAG_PURPOSE}": "real", f"tags.{TAG_DEVICE}": "NVIDIA H100"}
    row.update({f"metrics.{k}": v for k, v in metrics.items()})
    return row


def squad(f1, train_s, sps):
    return {M_EXACT: f1 - 3.0, M_F1: f1, M_TRAIN_RUNTIME: train_s, M_TRAIN_SPS: sps}


@pytest.fixture()
def runs():
    return pd.DataFrame([
        run("a1", "squad", "a1", 0, squad(76.6, 900.0, 44.0)),
        run("a2-failed", "squad", "a2", 1, squad(99.0, 10.0, 999.0), status="FAILED"),
        run("a3", "squad", "a3", 2, squad(76.9, 870.0, 45.3)),
        run("a4nb", "squad", "a4-nb", 3, squad(77.2, 766.0, 51.6)),
        run("b3", "squad", "b3", 4, squad(72.0, 440.0, 89.8)),
        run("c2", "squad", "c2", 5, squad(74.5, 1064.0, 38.0)),
        run("fp32", "sst2", "fp32", 6, {M_ACCURACY: 0.9163, M_TRAIN_RUNTIME: 875.0, M_TRAIN_SPS: 45.7}),
        run("qlora", "sst2", "qlora", 7, {M_ACCURACY: 0.9060, M_TRAIN_RUNTIME: 453.0, M_TRAIN_SPS: 88.3}),
        run("p-a3", "vram", "a3", 8, {M_PROBE_ALLOC: 3087.0, M_PROBE_RESERVED: 3256.0, M_DEVICE_TOTAL: 81559.0,
                                      M_MEM_PARAMS: 420.0, M_MEM_GRADS: 420.0, M_MEM_OPTIMIZER: 840.0,
                                      M_MEM_ACTIVATIONS: 1400.0}),
        run("p-c1", "vram", "c1", 9, {M_PROBE_ALLOC: 2466.0, M_PROBE_RESERVED: 2720.0, M_DEVICE_TOTAL: 81559.0}),
    ])


def assert_png(path: Path, min_side: int = 300) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert height >= min_side and width >= min_side
    assert pixels.std() > 0.01  # something was drawn, not a blank canvas


def test_pareto_front_keeps_only_undominated_points():
    points = [("A", 10.0, 70.0), ("B", 5.0, 60.0), ("C", 8.0, 65.0), ("D", 12.0, 68.0), ("E", 5.0, 55.0)]
    assert pareto_front(points) == [("B", 5.0, 60.0), ("C", 8.0, 65.0), ("A", 10.0, 70.0)]
    assert pareto_front([]) == []


def test_make_plots_writes_every_plot(runs, tmp_path):
    paths = make_plots(runs, tmp_path / "plots")
    assert [p.name for p in paths] == list(PLOT_FILES.values())
    for path in paths:
        assert_png(path)


@pytest.mark.parametrize("task", ["squad", "sst2"])
def test_pareto_plot_per_task(runs, tmp_path, task):
    assert_png(plot_pareto(runs, task, tmp_path / f"{task}.png"))


def test_vram_plot_mixes_stacked_and_plain_bars(runs, tmp_path):
    assert_png(plot_vram(runs, tmp_path / "vram.png"))


def test_throughput_plot_groups_both_tasks(runs, tmp_path):
    assert_png(plot_throughput(runs, tmp_path / "throughput.png"))


def test_missing_data_skips_the_plot(runs, tmp_path):
    squad_only = runs[runs[f"tags.{TAG_TASK}"] == "squad"]
    assert plot_pareto(squad_only, "sst2", tmp_path / "sst2.png") is None
    assert plot_vram(squad_only, tmp_path / "vram.png") is None
    assert [p.name for p in make_plots(squad_only, tmp_path)] == [PLOT_FILES["pareto_squad"],
                                                                  PLOT_FILES["throughput"]]
    # a FAILED run is no data: its metrics never reach a plot
    failed_only = runs[runs["status"] == "FAILED"]
    assert make_plots(failed_only, tmp_path / "none") == []
    assert not (tmp_path / "sst2.png").exists() and not (tmp_path / "vram.png").exists()


def test_pareto_rejects_an_unknown_task(runs, tmp_path):
    with pytest.raises(UsageError, match="vram"):
        plot_pareto(runs, "vram", tmp_path / "x.png")


def test_plots_show_means_over_seeds_with_intervals_and_label_smoke_runs(tmp_path):
    from hpml.report.plots import _devices_line, pareto_points, throughput_bars

    def seeded(run_id, seed, f1, sps, task="squad", variant="a2", purpose="test"):
        metrics = squad(f1, 100.0 + seed, sps) if task == "squad" else {M_ACCURACY: f1, M_TRAIN_RUNTIME: 50.0,
                                                                         M_TRAIN_SPS: sps}
        row = run(run_id, task, variant, seed, metrics)
        row.update({"tags.recipe_hash": f"{variant}-r", "params.resolved.seed": str(seed), "params.model": "random:tiny",
                    f"tags.{TAG_PURPOSE}": purpose, "tags.data_fingerprint": "0123456789abcdef"})
        return row

    runs = pd.DataFrame([seeded("s1", 1, 70.0, 40.0), seeded("s2", 2, 72.0, 44.0),
                         seeded("f1", 1, 0.8, 90.0, task="sst2", variant="fp32")])
    (label, x, y, xerr, yerr), = pareto_points(runs, "squad")
    assert (label, x, y) == ("A2", 101.5, 71.0) and yerr == pytest.approx(12.7062, abs=1e-3)  # t(0.975,1)*1.414/√2
    bars = throughput_bars(runs)
    assert bars["squad"] == [("A2", 42.0, pytest.approx(25.4124, abs=1e-3))] and bars["sst2"] == [("fp32", 90.0, 0.0)]
    assert _devices_line([runs.iloc[0]]) == ("measured on NVIDIA H100 · purpose test (not study data) · model "
                                             "random:tiny · data 01234567")
    assert_png(plot_throughput(runs, tmp_path / "t.png"))
