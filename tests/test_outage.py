"""Tracking-server outages: `mlflow run` against a dead server, a server lost mid-run and restarted, and one
lost for good (the export on disk, then `hpml log-export`), all against a real `mlflow server`."""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, LEAKY_ENV, REPO, free_port, with_venv_path

PLUGIN_GROUP = "mlflow.request_header_provider"


class Server:
    """`mlflow server` on a fixed port and SQLite file, so it can be killed and started again on the same
    store (the session's `mlflow_server` fixture cannot be stopped mid-test)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "art")],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
        raise RuntimeError("mlflow server did not answer /health within 120 s")

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost host: nothing is flushed, the port closes at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, migrated_store):
    srv = Server(tmp_path_factory.mktemp("outage-server"))
    shutil.copyfile(migrated_store / "mlflow.db", srv.root / "server.db")  # no migrations at startup
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """A folder for PYTHONPATH that registers hpml's MLflow plugin exactly as pyproject.toml declares it,
    for an environment installed before the entry point existed (`make` re-installs and registers it)."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][PLUGIN_GROUP]
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group=PLUGIN_GROUP)}
    folder = tmp_path_factory.mktemp("plugin")
    if installed.get("hpml") != declared["hpml"]:
        info = folder / "hpml_plugin_declared-0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hpml-plugin-declared\nVersion: 0\n")
        (info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\nhpml = {declared['hpml']}\n")
    return str(folder)


def subprocess_env(extra: dict, drop: tuple = ()) -> dict:
    env = with_venv_path({k: v for k, v in os.environ.items() if k not in LEAKY_ENV + drop})
    return {**env, **extra}


def test_plugin_leaves_other_programs_alone(monkeypatch):
    """Outside `mlflow run` of hpml (here: a plain Python process with a dead server) it does nothing."""
    from hpml.mlflow_plugin import FailFastTrackingServer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    provider = FailFastTrackingServer()
    assert provider.in_context() is False and provider.request_headers() == {}


def test_mlflow_run_dead_server_one_line(tmp_path, plugin_path, sst2_dir):
    """MLflow's own retries are on (about four minutes against a dead server); the plugin ends it first."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = subprocess_env({"MLFLOW_TRACKING_URI": dead,
                          "PYTHONPATH": os.pathsep.join(filter(None, [plugin_path, os.environ.get("PYTHONPATH")]))},
                         drop=("MLFLOW_HTTP_REQUEST_MAX_RETRIES",))
    start = time.monotonic()
    out = subprocess.run([str(BIN / "mlflow"), "run", str(REPO), "-e", "train_sst2", "--env-manager", "local",
                          "--experiment-name", "hpml-sst2", "-P", "variant=fp32", "-P", "model=random:tiny",
                          "-P", f"data_dir={sst2_dir}"], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    took = time.monotonic() - start
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert out.returncode != 0
    assert lines == [f"hpml: error: tracking server {dead} is unreachable ([Errno 111] Connection refused): start "
                     "it (mlflow server) or set MLFLOW_TRACKING_URI to a reachable server or sqlite:///mlflow.db"], lines
    assert took < 15, f"{took:.1f} s"  # 3.5-5.7 s measured on a loaded 2-core machine (mostly imports)


class Training:
    """`hpml train-sst2` on a random:tiny model as a subprocess, its stderr read line by line with times."""

    # A checkpoint every 4 steps tells the test that training is under way without asking the server; 36
    # steps after it remain to train while the server is down (one epoch is 12 steps of 8 rows). They must
    # outlast the other run's start: with 12 left, a run that started ~1.5 s ahead (a warm cache) could
    # finish before the server was stopped.
    STEPS, SAVE = 40, 4

    def __init__(self, tmp: Path, data: Path, server: Server, wait_s: float):
        tmp.mkdir()
        self.ckpt = tmp / "ckpt"
        env = subprocess_env({"MLFLOW_TRACKING_URI": server.url, "HPML_SERVER_WAIT_S": str(wait_s),
                              "HPML_SERVER_RETRY_S": "0.5",
                              "OMP_NUM_THREADS": "1"})  # two runs side by side on a 2-core machine
        self.proc = subprocess.Popen(
            [str(BIN / "hpml"), "train-sst2", "--variant", "fp32", "--model", "random:tiny", "--data-dir", str(data),
             "--max-steps", str(self.STEPS), "--save-steps", str(self.SAVE), "--batch-size", "8", "--max-length",
             "32", "--eval-batch-size", "16", "--purpose", "test", "--output-dir", str(self.ckpt)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
        self.err: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=lambda: self.err.extend((time.time(), ln) for ln in self.proc.stderr),
                                       daemon=True)
        self.reader.start()

    def wait_for_checkpoint(self, timeout: float = 180) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if list(self.ckpt.glob("*/checkpoint-*")):
                return time.time()
            assert self.proc.poll() is None, self.stderr()
            time.sleep(0.05)
        raise AssertionError("no checkpoint within the timeout:\n" + self.stderr())

    def wait_for_line(self, needle: str, timeout: float = 180) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for t, ln in list(self.err):
                if needle in ln:
                    return t
            assert self.proc.poll() is None, self.stderr()
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} line within the timeout:\n" + self.stderr())

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        out = self.proc.stdout.read()
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc, out, self.stderr()

    def stderr(self) -> str:
        return "".join(ln for _, ln in self.err)


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _check_finished(url: str, run_id: str, steps: int, predict: bool = False) -> dict:
    """FINISHED, one registered version (that loads and predicts), every metric at its step: the same end as
    a run that never saw an outage."""
    import mlflow
    import pandas as pd

    client = _client(url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    versions = client.search_model_versions(f"run_id='{run_id}'")
    assert len(versions) == 1
    assert float(versions[0].tags["eval_accuracy"]) == run.data.metrics["eval_accuracy"]
    loss_steps = [m.step for m in client.get_metric_history(run_id, "train_loss_running")]
    assert loss_steps == [steps]
    epochs = sorted({m.step for m in client.get_metric_history(run_id, "eval_accuracy")})
    assert epochs == list(range(1, steps // 12 + 1))  # after each whole epoch (12 steps); the final value sits
    # at the last epoch's step
    assert "predictions.json" in {a.path for a in client.list_artifacts(run_id)}
    assert run.data.tags["compiled"] == "no"  # a tag set after training, buffered like the metrics
    if predict:
        mlflow.set_tracking_uri(url)  # the autouse fixture in conftest resets it after the test
        model = mlflow.pyfunc.load_model(f"models:/{versions[0].name}/{versions[0].version}")
        assert set(model.predict(pd.DataFrame([{"text": "fine"}])).columns) >= {"label", "probability"}
    return run.data.metrics


@pytest.mark.slow
def test_server_lost_mid_run(tmp_path, sst2_dir, server):
    """Two runs over one outage (one server restart serves both): `back` waits long enough for the server
    to return and finishes normally; `gone` waits 2 s, saves its export and says where, and `hpml
    log-export` then logs it into the same run."""
    back = Training(tmp_path / "back", sst2_dir, server, wait_s=120)
    gone = Training(tmp_path / "gone", sst2_dir, server, wait_s=2)
    t_training = max(back.wait_for_checkpoint(), gone.wait_for_checkpoint())  # both train: setup is done
    server.kill()
    t_stop = time.time()
    # Both train on and end while the server is down; `back` then waits for it, `gone` gives up.
    rc, _, err = gone.finish()
    t_note = back.wait_for_line("hpml: note: tracking server")
    server.start()
    t_restart = time.time()

    # -- gone: exit 3, one line naming the export and the command, the export on disk
    assert rc == 3, err
    assert "Traceback" not in err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    m = re.fullmatch(rf"hpml: error: tracking server {server.url} unreachable since \d\d:\d\d:\d\d: run "
                     r"([0-9a-f]{32})'s model, metrics and artifacts are saved in (\S+); once the server is back, "
                     r"log them with: hpml log-export (\S+)", last)
    assert m, last
    gone_id, path = m.group(1), m.group(2)
    assert m.group(3) == path and Path(path) == tmp_path / "gone" / "ckpt" / gone_id / "pending-export"
    assert (Path(path) / "model").is_dir() and (Path(path) / "artifacts" / "predictions.json").is_file()
    assert not list(Path(path).parent.glob("checkpoint-*"))  # trained to the end: the export suffices

    # -- back: the same end as without an outage
    rc, out, err = back.finish()
    assert rc == 0, err
    back_id = re.search(r"run ([0-9a-f]{32}) \(fp32\)", out).group(1)
    metrics = _check_finished(server.url, back_id, Training.STEPS)
    # Training was under way at t_training and over by t_note, with the server down from t_stop to
    # t_restart. Had a step waited for the server, training would have ended after t_restart, so
    # train_runtime_s would be at least t_restart - t_training. Not waiting, it ended before t_note, which
    # precedes t_restart. No tolerance is needed: the two ranges do not overlap.
    assert t_restart - t_stop > 1.0 and t_note < t_restart
    assert metrics["train_runtime_s"] < t_restart - t_training, (metrics["train_runtime_s"], t_restart - t_training)
    assert metrics["train_samples_per_s"] > 0
    # Metrics logged while the server was down landed at their steps with their own (outage-time) timestamps.
    during = [m for m in _client(server.url).get_metric_history(back_id, "eval_accuracy")
              if t_stop * 1000 <= m.timestamp <= t_restart * 1000]
    assert during, "no metric was logged during the outage"
    assert not (tmp_path / "back" / "ckpt" / back_id).exists()  # finished: checkpoints gone, as after any run

    # -- gone, once the server is back: hpml log-export (in-process: the export names its server)
    from click.testing import CliRunner

    from hpml.cli import main

    out = CliRunner().invoke(main, ["log-export", path])
    assert out.exit_code == 0, out.output
    assert f"run {gone_id} (fp32)" in out.output and "registered hpml-sst2-fp32 version" in out.output
    _check_finished(server.url, gone_id, Training.STEPS, predict=True)
    assert not (tmp_path / "gone" / "ckpt" / gone_id).exists()
