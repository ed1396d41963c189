"""`hpml series`: planning on its own (pure), then a squad-a-like series through `mlflow run . -e series`: one
parent, a child per variant × seed, the report last; a killed child is the only one a rerun trains again, and
a complete series run again creates no child at all."""
import csv
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import BIN, LEAKY_ENV, REPO, with_venv_path
from hpml import tracking as T
from hpml.cli import main
from hpml.data import synthetic
from hpml.errors import UsageError
from hpml.series import resolve_variants, series_key, task_data_dir


def test_study_tables_run_their_baseline_and_skip_cuda_variants_on_a_cpu():
    variants, skipped = resolve_variants("squad-c", cuda=False)
    assert [v.id for v in variants] == ["a3", "c2"]  # the baseline first
    assert skipped == [f"skip {v}: needs CUDA (bitsandbytes), this machine has none" for v in ("c1", "c2-8")]
    assert [v.id for v in resolve_variants("squad-c", cuda=True)[0]] == ["a3", "c1", "c2-8", "c2"]
    assert [v.id for v in resolve_variants("squad-a", cuda=False)[0]] == ["a2", "a1", "a3", "a4-nb", "a4-b", "d1"]
    assert [v.id for v in resolve_variants("A2, fp32", cuda=False)[0]] == ["a2", "fp32"]


@pytest.mark.parametrize("name, message", [
    ("a2,qlora", "variant qlora needs CUDA"),  # named explicitly: refused, not skipped
    ("squad-z", "unknown series 'squad-z'"),
    ("a2,zz", "unknown variant 'zz'"),
])
def test_bad_series_names_end_in_one_line(name, message):
    with pytest.raises(UsageError, match=message):
        resolve_variants(name, cuda=False)


def test_cli_refuses_bad_input_before_any_run(empty_tracking_uri, tmp_path):
    result = CliRunner().invoke(main, ["series", "a2,a1", "--seeds", "0"])
    assert result.exit_code == 2 and result.output.strip() == "hpml: error: seeds must be 1 or more, got 0"
    result = CliRunner().invoke(main, ["series", "fp32", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "has no sst2 data" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # refused before connecting: no store, no run


def test_mixed_series_take_each_task_from_its_subfolder(tmp_path):
    synthetic.write_sst2(str(tmp_path / "sst2"), 8, 8, seed=0)
    assert task_data_dir(str(tmp_path), "sst2") == str(tmp_path / "sst2")
    assert task_data_dir(str(tmp_path / "sst2"), "sst2") == str(tmp_path / "sst2")
    assert series_key("a2", {"seeds": 1, "lr": ""}) == series_key("A2", {"seeds": 3, "lr": ""})  # seeds extend


def _series_cmd(data_dir, out):
    params = {"out": out, "seeds": 2, "model": "random:tiny", "data_dir": data_dir, "max_train_samples": "16",
              "max_eval_samples": 6, "max_steps": 2, "batch_size": 4, "eval_batch_size": 8, "max_length": 96,
              "doc_stride": 16, "purpose": "test"}  # doc_stride < max_length - 67 (question room)
    args = [str(BIN / "mlflow"), "run", str(REPO), "-e", "series", "--env-manager", "local",
            "--experiment-name", "hpml-series", "-P", "name=a1,a2"]
    return args + [a for k, v in params.items() for a in ("-P", f"{k}={v}")]


def _env():
    return with_venv_path({k: v for k, v in os.environ.items() if k not in LEAKY_ENV})


def _runs(client):
    exp = client.get_experiment_by_name("hpml-series")
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_series_resumes_and_retries_only_the_killed_child(tracking_uri, tmp_path):
    data = tmp_path / "squad"
    synthetic.write_squad(str(data), 16, 6, seed=3)
    cmd = _series_cmd(str(data), str(tmp_path / "report"))
    # 1. Kill the third child's process (SIGKILL: it cannot end its own run) while the series goes on.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if killed is None and line.startswith("[3/4] a2/seed42: running (pid "):
            killed = int(line.split("(pid ", 1)[1].split(",", 1)[0])
            os.kill(killed, signal.SIGKILL)
    assert proc.wait(timeout=900) != 0 and killed, "\n".join(lines[-20:])
    out = "\n".join(lines)
    assert "[3/4] a2/seed42: KILLED" in out and "[4/4] a2/seed43: FINISHED" in out
    assert ("1 of 4 runs did not finish (a2/seed42): rerun the same command to retry only those (a killed one "
            "resumes from its last checkpoint)") in out

    client = MlflowClient(tracking_uri)
    runs = _runs(client)
    parents = [r for r in runs if r.data.tags.get(T.TAG_TASK) == "series"]
    assert len(parents) == 1 and parents[0].data.tags[T.TAG_SERIES] == "a1,a2"
    parent = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get(T.TAG_PARENT) == parent]
    status = sorted((r.data.tags[T.TAG_SERIES_CHILD], r.info.status) for r in children)
    assert status == [("a1/seed42", "FINISHED"), ("a1/seed43", "FINISHED"), ("a2/seed42", "KILLED"),
                      ("a2/seed43", "FINISHED"), ("report", "FINISHED")]
    for r in children:  # children keep their own task; the report is a child too
        want = "report" if r.data.tags[T.TAG_SERIES_CHILD] == "report" else "squad"
        assert r.data.tags[T.TAG_TASK] == want and r.info.experiment_id == parents[0].info.experiment_id

    # 2. The same command: only the killed child trains again (and the report, which now covers 4 runs).
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count(": kept FINISHED run") == 3 and "[4/4] a2/seed42: FINISHED" in again.stdout
    runs = _runs(client)
    children = [r for r in runs if r.data.tags.get(T.TAG_PARENT) == parent]
    assert len(children) == 7  # + the retried child + a new report
    finished = sorted(r.data.tags[T.TAG_SERIES_CHILD] for r in children if r.info.status == "FINISHED")
    assert finished == ["a1/seed42", "a1/seed43", "a2/seed42", "a2/seed43", "report", "report"]
    assert client.get_run(parent).info.status == "FINISHED"
    resumed = [r for r in runs if r.data.tags.get(T.TAG_SERIES_RESUMED) == parent]
    assert len(resumed) == 1 and len([r for r in runs if r.data.tags.get(T.TAG_TASK) == "series"]) == 1
    # the report child's tables aggregate both seeds of each variant, model named, and the differences to A2
    rows = {r["ID"]: r for r in csv.DictReader(open(tmp_path / "report" / "table2_a_series.csv"))}
    assert [(rows[i]["model"], rows[i]["seeds"]) for i in ("A1", "A2")] == [("random:tiny", "2")] * 2
    assert rows["A3"]["seeds"] == "" and float(rows["A1"]["F1"]) >= 0.0
    stats = [r for r in csv.DictReader(open(tmp_path / "report" / "table7_statistics.csv")) if r["metric"] == "F1"]
    assert [(r["ID"], r["seeds"], r["baseline"]) for r in stats] == [("A1", "2", "A2"), ("A2", "2", "A2")]
    assert stats[0]["verdict"] in ("within noise", "higher", "lower") and stats[1]["verdict"] == "baseline"

    # 3. Complete: nothing new at all; a direct `hpml series` (in-process here, to save a start-up) finds the same
    #    parent by its name and parameters.
    args = ["series", "a1,a2"] + [a for p in cmd[cmd.index("name=a1,a2") + 1:] if p != "-P"
                                  for a in ("--" + p.split("=", 1)[0].replace("_", "-"), p.split("=", 1)[1])]
    third = CliRunner().invoke(main, args)
    assert third.exit_code == 0 and "report: kept FINISHED run" in third.output, third.output[-2000:]
    assert third.output.count(": kept FINISHED run") == 5 and f"parent run {parent}" in third.output
    assert len([r for r in _runs(client) if r.data.tags.get(T.TAG_PARENT) == parent]) == 7


def _attempt(run_id: str, status: str, folder: str, identity: dict):
    from types import SimpleNamespace

    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status),
                           data=SimpleNamespace(tags={T.TAG_CHECKPOINT_DIR: folder, **identity}))


def test_a_killed_attempt_with_a_checkpoint_is_resumed_and_the_others_folders_removed(tmp_path, capsys):
    from hpml.checkpoints import LOSS_FILE
    from hpml.config import TrainConfig
    from hpml.series import Child, _drop_checkpoints, _resumable

    same = {T.TAG_CONFIG_HASH: "c1", T.TAG_FINGERPRINT: "f1", T.TAG_GIT_COMMIT: "g1"}
    child = Child(TrainConfig(task="sst2", variant="fp32"), same)
    folders = {}
    for name, complete in (("killed", True), ("partial", False), ("failed", True), ("other-commit", True)):
        folders[name] = tmp_path / "hpml-checkpoints" / name
        (folders[name] / "checkpoint-4").mkdir(parents=True)
        if complete:  # Trainer's files first, hpml's loss file last: without it a kill came mid-save
            (folders[name] / "checkpoint-4" / LOSS_FILE).write_text("{}")
    runs = [_attempt("partial", "KILLED", str(folders["partial"]), same),  # newest first
            _attempt("other-commit", "KILLED", str(folders["other-commit"]), {**same, T.TAG_GIT_COMMIT: "g0"}),
            _attempt("failed", "FAILED", str(folders["failed"]), same),
            _attempt("killed", "KILLED", str(folders["killed"]), same)]
    assert _resumable(runs, child) == ("killed", str(folders["killed"] / "checkpoint-4"))
    _drop_checkpoints(runs, keep="killed")
    assert sorted(p.name for p in (tmp_path / "hpml-checkpoints").iterdir()) == ["killed"]
    assert capsys.readouterr().out.count("removed the checkpoints of run") == 3
    assert _resumable(runs[:3], child) is None  # no killed attempt of this code with a whole checkpoint


@pytest.mark.slow
def test_a_child_killed_after_a_checkpoint_resumes_in_its_own_run(tracking_uri, sst2_dir, tmp_path):
    cmd = [sys.executable, "-m", "hpml.cli", "series", "fp32", "--model", "random:tiny", "--data-dir", str(sst2_dir),
           "--max-steps", "40", "--save-steps", "2", "--batch-size", "4", "--eval-batch-size", "16",
           "--max-length", "32", "--purpose", "test", "--out", str(tmp_path / "report")]
    env = with_venv_path({**os.environ, "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines, run_id = [], None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if run_id is None and line.startswith("[1/1] fp32/seed42: running (pid "):
            pid = int(line.split("(pid ", 1)[1].split(",", 1)[0])
            run_id = line.split(", run ", 1)[1].split(",", 1)[0]
            deadline = time.time() + 240
            while not glob.glob(str(tmp_path / "hpml-checkpoints" / run_id / "checkpoint-*" / "hpml_loss.json")):
                assert time.time() < deadline, "no checkpoint within 240 s"
                time.sleep(0.005)
            os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=600) == 1 and run_id, "\n".join(lines[-20:])
    assert "[1/1] fp32/seed42: KILLED" in "\n".join(lines)

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[1/1] fp32/seed42: resuming from checkpoint-" in again.stdout and f"run {run_id}" in again.stdout
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags[T.TAG_RESUMED_AT]) >= 2
    assert "eval_accuracy" in run.data.metrics
    attempts = [r for r in _runs(client) if r.data.tags.get(T.TAG_SERIES_CHILD) == "fp32/seed42"]
    assert [r.info.run_id for r in attempts] == [run_id]  # continued, not trained again in a new run
    assert not (tmp_path / "hpml-checkpoints" / run_id).exists()  # a finished run deletes its checkpoints
