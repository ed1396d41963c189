"""A fresh SQLite store used by several processes at once: every one of them logs its run."""
import subprocess
import sys

from mlflow import MlflowClient

from conftest import REPO

SCRIPT = """
import sys, mlflow
from hpml import tracking
tracking.connect()
mlflow.set_experiment("concurrent")
with mlflow.start_run(run_name=sys.argv[1]):
    mlflow.log_metric("x", float(sys.argv[1]))
"""


def test_four_processes_on_a_fresh_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i)], cwd=tmp_path, stderr=subprocess.PIPE,
                              text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
             for i in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(e[-800:] for e in errors)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.data.metrics["x"] for r in runs) == [0.0, 1.0, 2.0, 3.0]
