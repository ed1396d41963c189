"""The report command end to end: a real `mlflow server` seeded with real CLI runs and runs of known values,
`mlflow run . -e report`, then every table cell, the plots and the logged report run checked on the server."""
from __future__ import annotations

import csv
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from conftest import free_port, last_line, mlflow_run, run_cmd
from hpml import tracking as T
from hpml.errors import UsageError
from hpml.report.plots import PLOT_FILES
from hpml.variants import CATALOG


_ = "—"  # a measured cell without a FINISHED run (or a metric the run did not log)
H100 = "NVIDIA H100 80GB HBM3"
SANDBOX = "team-sandbox"  # not an hpml experiment name: the report must find these runs by their tags
TABLES = ("table1_configurations", "table2_a_series", "table3_b_series", "table4_c_series", "table5_vram",
          "table6_sst2", "table7_statistics")
NOW_MS = int(time.time() * 1000)
MIN_MS = 60_000

SQUAD_COLS = [T.M_EXACT, T.M_F1, T.M_EVAL_RUNTIME, T.M_EVAL_SPS, T.M_TRAIN_LOSS, T.M_TRAIN_RUNTIME, T.M_TRAIN_SPS]


def squad_metrics(*values):
    return dict(zip(SQUAD_COLS, values))


# (task, variant, status, minutes ago, purpose, metrics): logged with the client, values known exactly.
KNOWN_RUNS = [
    # A1: two FINISHED test runs, the newer wins; a still newer demo run is dropped by purpose=test.
    ("squad", "a1", "FINISHED", 120, "test", squad_metrics(70.0, 72.0, 60.0, 150.0, 0.9, 9500.0, 40.0)),
    ("squad", "a1", "FINISHED", 60, "test", squad_metrics(73.21, 76.62, 66.97, 181.19, 0.796, 9001.32, 43.91)),
    ("squad", "a1", "FINISHED", 30, "demo", squad_metrics(11.0, 12.0, 1.0, 2.0, 3.0, 4.0, 5.0)),
    # A3: only a FAILED run, so its row stays empty. B3: a newer FAILED run loses to the older FINISHED one.
    ("squad", "a3", "FAILED", 50, "test", squad_metrics(99.0, 99.0, 9.0, 9.0, 9.0, 9.0, 9.0)),
    ("squad", "b3", "FINISHED", 90, "test", squad_metrics(68.21, 71.99, 71.6, 169.46, 1.05, 4403.16, 89.77)),
    ("squad", "b3", "FAILED", 20, "test", squad_metrics(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)),
    # B1 still RUNNING: a half-finished run is not a result.
    ("squad", "b1", "RUNNING", 10, "test", squad_metrics(51.12, 54.95, 81.16, 149.5, 1.94, 5613.03, 70.42)),
    ("squad", "c2", "FINISHED", 80, "test", {T.M_EXACT: 70.85, T.M_F1: 74.53, T.M_EVAL_RUNTIME: 74.88,
                                            T.M_EVAL_SPS: 162.05, T.M_TRAIN_LOSS: 0.82, T.M_TRAIN_RUNTIME: 10645.29}),
    ("vram", "a3", "FINISHED", 70, "test", {T.M_PROBE_ALLOC: 3087.0, T.M_PROBE_RESERVED: 3256.0,
                                           T.M_DEVICE_TOTAL: 14915.7, T.M_MEM_PARAMS: 420.0, T.M_MEM_GRADS: 420.0,
                                           T.M_MEM_OPTIMIZER: 840.0, T.M_MEM_ACTIVATIONS: 1407.0}),
    ("vram", "c1", "FINISHED", 65, "test", {T.M_PROBE_ALLOC: 2465.94, T.M_PROBE_RESERVED: 2720.0,
                                           T.M_DEVICE_TOTAL: 14915.7, T.M_MEM_PARAMS: 420.0, T.M_MEM_GRADS: 420.0,
                                           T.M_MEM_OPTIMIZER: 210.0, T.M_MEM_ACTIVATIONS: 1415.94}),
    ("sst2", "qlora", "FINISHED", 40, "test", {
        T.M_TRAINABLE: 591362, T.M_TOTAL: 66_000_000, T.M_FULL_ARCH_PARAMS: 109483778, T.M_TRAIN_RUNTIME: 453.0,
        T.M_PEAK_TRAIN_ALLOC: 1638.87, T.M_ACCURACY: 0.906, T.M_EVAL_MS: 3.2502, T.M_VRAM_AFTER_LOAD: 99.0,
        T.M_PEAK_EVAL_VRAM: 1124.68, T.M_TRAIN_SPS: 70.0}),
]

# Real runs through the CLI (metrics unknown in advance: the expected cells are read back from the server).
# --register false: the registry is not what this file tests, and logging the model costs seconds.
CLI_RUNS = [
    ("train-sst2", "fp32", ["--data-dir", "{sst2}"]),
    ("train-sst2", "lora", ["--data-dir", "{sst2}"]),
    ("train-squad", "a2", ["--data-dir", "{squad}", "--max-eval-samples", "10"]),
]


def log_known_runs(client: MlflowClient) -> None:
    exp_id = client.create_experiment(SANDBOX)
    for task, variant, status, minutes_ago, purpose, metrics in KNOWN_RUNS:
        start = NOW_MS - minutes_ago * MIN_MS
        tags = {T.TAG_TASK: task, T.TAG_VARIANT: variant, T.TAG_PURPOSE: purpose, T.TAG_DEVICE: H100,
                T.TAG_FINGERPRINT: f"fp-{task}"}
        run = client.create_run(exp_id, start_time=start, tags=tags, run_name=variant)
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), start, 0) for k, v in metrics.items()])
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status, end_time=start + MIN_MS)
    # A run of someone else's, no hpml tags, in the Default experiment: searched, then ignored.
    other = client.create_run("0", tags={"owner": "someone"})
    client.log_batch(other.info.run_id, metrics=[Metric(T.M_F1, 1.0, NOW_MS, 0)])
    client.set_terminated(other.info.run_id, "FINISHED")


@pytest.fixture(scope="module")
def seeded(mlflow_server, sst2_dir, squad_dir, tmp_path_factory):
    """The server with three real tiny CLI runs (in parallel: each is mostly import time) and the known runs."""
    env = {"MLFLOW_TRACKING_URI": mlflow_server,
           "HPML_CACHE_DIR": str(tmp_path_factory.mktemp("report-e2e-cache"))}

    def train(spec):
        command, variant, extra = spec
        extra = [a.format(sst2=sst2_dir, squad=squad_dir) for a in extra]
        return run_cmd(["hpml", command, "--variant", variant, "--model", "random:tiny", "--max-steps", "2",
                        "--purpose", "test", "--register", "false", *extra], env=env, timeout=300)

    with ThreadPoolExecutor(len(CLI_RUNS)) as pool:
        futures = [pool.submit(train, spec) for spec in CLI_RUNS]
        log_known_runs(MlflowClient(mlflow_server))
        results = [f.result() for f in futures]
    for spec, res in zip(CLI_RUNS, results):
        assert res.returncode == 0, f"{spec}: {res.stderr[-3000:]}"
    return mlflow_server


@pytest.fixture(scope="module")
def reported(seeded, tmp_path_factory):
    """`mlflow run . -e report` against the seeded server, as the README shows it."""
    out = tmp_path_factory.mktemp("report-out")
    with pytest.MonkeyPatch.context() as mp:  # mlflow run creates its run where MLFLOW_TRACKING_URI points
        mp.setenv("MLFLOW_TRACKING_URI", seeded)
        res = mlflow_run("report", {"out": out, "purpose": "test"}, experiment=T.DEFAULT_EXPERIMENT["report"],
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def read_table(out: Path, name: str) -> list[dict[str, str]]:
    with open(out / f"{name}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def server_metrics(client: MlflowClient, task: str, variant: str) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics and tags of the one CLI run of (task, variant)."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.{T.TAG_TASK} = '{task}' and tags.{T.TAG_VARIANT} = '{variant}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.status == "FINISHED"
    return runs[0].data.metrics, runs[0].data.tags


def cell(metrics: dict[str, float], name: str, decimals: int, scale: float = 1.0) -> str:
    return f"{metrics[name] * scale:.{decimals}f}" if name in metrics else _


def num(value: str) -> str:
    """A number column in the CSV: an absent value is an empty cell, never "—"."""
    return "" if value == _ else value


def params_cells(metrics: dict[str, float]) -> dict[str, str]:
    if not metrics:
        return {"trainable params": "", "total params": "", "trainable %": ""}
    trainable, total = metrics[T.M_TRAINABLE], metrics.get(T.M_FULL_ARCH_PARAMS) or metrics[T.M_TOTAL]
    pct = f"{100 * trainable / total:.2f}".rstrip("0").rstrip(".")
    return {"trainable params": str(int(trainable)), "total params": str(int(total)), "trainable %": pct}


def squad_row(label, values, study_em, study_f1, device, knobs=None, model=_):
    """One run per variant here: seeds 1 where measured, and no interval (±95% empty) below 2 seeds."""
    em, f1, t_eval, eval_sps, loss, t_train, train_sps = values
    row = {"ID": label}
    if knobs is not None:
        row["key knobs"] = knobs
    row.update({"model": model, "seeds": "1" if em != _ else "", "EM": em, "EM (study, T4)": study_em, "F1": f1,
                "F1 ±95%": _, "F1 (study, T4)": study_f1, "T_eval s": t_eval, "eval samp/s": eval_sps,
                "train loss": loss, "T_train s": t_train, "train samp/s": train_sps, "train samp/s ±95%": _,
                "device": device})
    return {k: v if k in ("ID", "key knobs", "model", "device") else num(v) for k, v in row.items()}


EMPTY7 = (_,) * 7
HERE = T.device_name()  # the device tag runs made in this test get: "cpu" here, the GPU's name on CUDA


# ---- the report over HTTP: every table, the plots, the logged run ---------------------------------------
def test_report_tables_have_the_expected_cells(reported, mlflow_server):
    out, res = reported
    client = MlflowClient(mlflow_server)

    assert [r["ID"] for r in read_table(out, "table1_configurations")] == [v.id for v in CATALOG]

    a2, a2_tags = server_metrics(client, "squad", "a2")
    assert a2_tags[T.TAG_DEVICE] == HERE and a2_tags[T.TAG_PURPOSE] == "test"
    a2_cells = tuple(cell(a2, m, d) for m, d in zip(SQUAD_COLS, (2, 2, 2, 2, 3, 2, 2)))
    assert read_table(out, "table2_a_series") == [
        squad_row("A1", ("73.21", "76.62", "66.97", "181.19", "0.796", "9001.32", "43.91"), "73.21", "76.62", H100),
        squad_row("A2", a2_cells, "73.26", "76.56", HERE, model="random:tiny"),
        squad_row("A3", EMPTY7, "73.37", "76.89", _),  # only a FAILED run
        squad_row("A4-nb", EMPTY7, "73.78", "77.23", _),
        squad_row("A4-b", EMPTY7, "25.82", "26.87", _),
        squad_row("D1", EMPTY7, "73.04", "76.35", _),
    ]
    assert read_table(out, "table3_b_series") == [
        squad_row("B1", EMPTY7, "51.12", "54.95", _),  # only a RUNNING run
        squad_row("B2", EMPTY7, "54.61", "58.00", _),
        squad_row("B3", ("68.21", "71.99", "71.60", "169.46", "1.050", "4403.16", "89.77"), "68.21", "71.99", H100),
    ]
    knobs = {v.id: v.knobs() for v in CATALOG}
    assert read_table(out, "table4_c_series") == [
        squad_row("C1", EMPTY7, "72.64", "76.27", _, knobs["c1"]),
        squad_row("C2-8", EMPTY7, "72.67", "76.14", _, knobs["c2-8"]),
        squad_row("C2", ("70.85", "74.53", "74.88", "162.05", "0.820", "10645.29", _), "70.85", "74.53", H100,
                  knobs["c2"]),
    ]

    def vram(label, measured, study_alloc, study_reserved, breakdown, device):
        alloc, reserved, total = measured
        row = {"ID": label, "peak allocated MiB": alloc, "peak allocated MiB (study, T4)": study_alloc,
               "peak reserved MiB": reserved, "peak reserved MiB (study, T4)": study_reserved,
               "device total MiB": total, **dict(zip(("params MiB", "grads MiB", "optimizer MiB",
                                                       "activations MiB"), breakdown)), "device": device}
        return {k: v if k in ("ID", "device") else num(v) for k, v in row.items()}

    assert read_table(out, "table5_vram") == [
        vram("A3", ("3087.0", "3256.0", "14915.7"), "3087.0", "3256.0", ("420.0", "420.0", "840.0", "1407.0"), H100),
        vram("C1", ("2465.9", "2720.0", "14915.7"), "2465.9", "2720.0", ("420.0", "420.0", "210.0", "1415.9"), H100),
        vram("C2", (_, _, _), "2100.2", "2344.0", (_, _, _, _), _),
    ]

    def sst2(vid, m, device, study_acc, study_epochs, model=_):
        return {"ID": vid, "model": model, "seeds": "1" if m else "", **params_cells(m),
                "train min": num(cell(m, T.M_TRAIN_RUNTIME, 2, 1 / 60)),
                "peak train VRAM MiB": num(cell(m, T.M_PEAK_TRAIN_ALLOC, 1)),
                "val acc": num(cell(m, T.M_ACCURACY, 4)), "val acc ±95%": "", "val acc (study, T4)": num(study_acc),
                "val acc per epoch (study, T4)": study_epochs, "latency ms/sample": num(cell(m, T.M_EVAL_MS, 4)),
                "VRAM after load MiB": num(cell(m, T.M_VRAM_AFTER_LOAD, 1)),
                "peak eval VRAM MiB": num(cell(m, T.M_PEAK_EVAL_VRAM, 1)), "device": device}

    fp32, _tags = server_metrics(client, "sst2", "fp32")
    lora, _tags = server_metrics(client, "sst2", "lora")
    assert fp32[T.M_TRAINABLE] == fp32[T.M_TOTAL] and lora[T.M_TRAINABLE] < lora[T.M_TOTAL]
    table6 = read_table(out, "table6_sst2")
    assert table6 == [
        sst2("fp32", fp32, HERE, "0.9163", "0.9025 → 0.9163", model="random:tiny"),
        sst2("bf16", {}, _, _, _),
        sst2("lora", lora, HERE, _, _, model="random:tiny"),
        sst2("qlora", KNOWN_RUNS[-1][-1], H100, "0.9060", "0.8933 → 0.9060"),
    ]
    # The known QLoRA row in full, so the expectation above is not only the table's own arithmetic again.
    assert [table6[3][c] for c in ("trainable params", "total params", "trainable %")] == ["591362", "109483778",
                                                                                           "0.54"]
    assert [table6[3][c] for c in ("train min", "peak train VRAM MiB", "val acc", "latency ms/sample",
                                   "VRAM after load MiB", "peak eval VRAM MiB")] == \
        ["7.55", "1638.9", "0.9060", "3.2502", "99.0", "1124.7"]
    if HERE == "cpu":
        assert table6[0]["peak train VRAM MiB"] == ""  # not measured on CPU: absent, never 0
    else:
        assert float(table6[0]["peak train VRAM MiB"]) > 0
    # Table 7: one seed each, so differences without intervals; fp32 is the SST-2 baseline
    stats = {(r["ID"], r["metric"]): r for r in read_table(out, "table7_statistics")}
    assert stats[("A1", "F1")]["diff"] == f"{76.62 - a2[T.M_F1]:.2f}"
    assert stats[("A1", "F1")]["verdict"] == "one seed: no interval" and stats[("A2", "F1")]["verdict"] == "baseline"
    assert stats[("lora", "val acc")]["baseline"] == "fp32" and stats[("fp32", "val acc")]["verdict"] == "baseline"

    # The Markdown went to stdout and to report.md; each table also as LaTeX.
    assert "# hpml report" in res.stdout and "### Table 6: SST-2" in res.stdout
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# hpml report")
    assert all((out / f"{name}.tex").read_text(encoding="utf-8").startswith(r"\begin{table}") for name in TABLES)


def test_report_writes_valid_plots(reported):
    from PIL import Image

    out, res = reported
    for name in PLOT_FILES.values():  # every plot has data here, so none is skipped
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
            img.verify()
    assert "skipped plots" not in res.stderr


def test_report_run_is_logged_on_the_server(reported, mlflow_server):
    out, _res = reported
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(T.DEFAULT_EXPERIMENT["report"])
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == T.REPORT_RUN_NAME
    assert run.data.tags[T.TAG_TASK] == "report" and run.data.params["purpose"] == "test"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"report.md", *PLOT_FILES.values(), *(f"{t}.{ext}" for t in TABLES for ext in ("csv", "tex"))}
    assert logged == expected == {p.name for p in out.iterdir()}


def test_search_runs_by_experiment_name(seeded, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", seeded)  # restored afterwards, as set_tracking_uri exports it
    mlflow.set_tracking_uri(seeded)
    try:
        df = T.search_runs([SANDBOX])
        assert len(df) == len(KNOWN_RUNS)
        everything = T.search_runs(None)
        assert len(everything) >= len(KNOWN_RUNS) + len(CLI_RUNS) + 1
        with pytest.raises(UsageError, match="no-such-exp"):
            T.search_runs(["no-such-exp"])
    finally:
        mlflow.set_tracking_uri(None)


# ---- failures: one line, non-zero exit, nothing FINISHED left behind ------------------------------------
def test_empty_store_is_one_line_and_leaves_no_finished_run(tracking_uri, tmp_path):
    res = run_cmd(["hpml", "report", "--out", str(tmp_path / "out")], timeout=120)
    assert res.returncode == 1
    line = last_line(res.stderr)
    assert line.startswith("hpml: error: no FINISHED hpml runs found at " + tracking_uri), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    client = MlflowClient(tracking_uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(exp_ids, "attributes.status = 'FINISHED'")
    assert not (tmp_path / "out").exists()


def test_unreachable_server_is_one_fast_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    start = time.monotonic()
    res = run_cmd(["hpml", "report", "--tracking-uri", uri, "--out", str(tmp_path / "out")], timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode == 1
    line = last_line(res.stderr)
    assert line.startswith(f"hpml: error: tracking server {uri} is unreachable"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr and elapsed < 15
