"""Clean ends: SIGTERM/SIGINT mid-training leave a KILLED run, a checkpoint, no version and no temp folder;
SIGINT during tokenization stops before any run exists."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import REPO, last_line, with_venv_path


def start(args, cwd, tmp):
    env = with_venv_path({**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)})
    err = open(cwd / "stderr.txt", "w")
    return subprocess.Popen([sys.executable, "-m", "hpml.cli", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=err), cwd / "stderr.txt"


def wait_for(cond, proc, errfile, what, timeout=300):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"exited before {what}: {errfile.read_text()[-2000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


def all_runs(client):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_training_ends_killed_with_a_checkpoint(sig, sst2_dir, tracking_uri, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["train-sst2", "--variant", "fp32", "--model", "random:tiny", "--data-dir", str(sst2_dir), "--max-steps",
            "400", "--batch-size", "4", "--max-length", "32", "--purpose", "test", "--save-steps", "2"]
    proc, errfile = start(args, tmp_path, tmp)
    ckpts = str(tmp_path / "hpml-checkpoints" / "*" / "checkpoint-*" / "hpml_loss.json")
    wait_for(lambda: glob.glob(ckpts), proc, errfile, "checkpoint")
    seen = set(glob.glob(ckpts))
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 128 + sig
    assert last_line(errfile.read_text()).startswith(f"hpml: stopped by {sig.name}")
    client = MlflowClient(tracking_uri)  # not the URI an earlier in-process test left in mlflow's globals
    [run] = all_runs(client)
    assert run.info.status == "KILLED"
    assert client.search_model_versions() == []
    assert os.listdir(tmp) == [], "the run's temp folder is removed"
    # the stop wrote a checkpoint at the step it stopped at (newer than every one seen before the signal)
    assert set(glob.glob(ckpts)) - seen


class CtrlCTokenizer:
    """A tokenizer that presses Ctrl-C (SIGINT to this process) when datasets hashes it, or when it runs."""

    def __init__(self, tok, on_call: bool):
        self.tok, self.name_or_path, self.on_call = tok, tok.name_or_path, on_call

    def __len__(self):
        return len(self.tok)

    hashed = False

    def __getstate__(self):  # datasets pickles a map function's closure to fingerprint it
        CtrlCTokenizer.hashed = True
        os.kill(os.getpid(), signal.SIGINT)
        return {}

    def __call__(self, *args, **kwargs):
        if self.on_call:
            os.kill(os.getpid(), signal.SIGINT)
        return self.tok(*args, **kwargs)


def test_sigint_during_tokenization_is_honoured(sst2_dir):
    """datasets fingerprints a map function inside a bare `except:`; a Ctrl-C landing there was swallowed and
    the run went on. SST-2 tokenization passes its own fingerprint (nothing is hashed, so no Ctrl-C can be
    lost there), and a Ctrl-C while the tokenizer runs stops it."""
    import datasets

    from hpml import modeling, signals
    from hpml.data import sst2
    from hpml.tasks import classification

    tok = modeling.load_tokenizer("random:tiny")
    ds = datasets.Dataset.from_dict(sst2.read_tsv(str(sst2_dir / "train.tsv")))
    with signals.handled():
        assert len(classification.tokenize(ds, CtrlCTokenizer(tok, on_call=False), 32, ("sentence",))) == len(ds)
        assert not CtrlCTokenizer.hashed, "the Ctrl-C pressed while datasets hashed the tokenizer was swallowed"
        with pytest.raises(signals.Interrupted):
            classification.tokenize(ds, CtrlCTokenizer(tok, on_call=True), 32, ("sentence",))


CHILD = """
import time
from hpml import signals
signals.die_with_parent()
with signals.handled():
    print("ready", flush=True)
    try:
        time.sleep(60)
    except signals.Interrupted as exc:
        print(exc, flush=True)
        raise SystemExit(exc.exit_code)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_entry_point_dies_with_its_mlflow_run_parent(tmp_path):
    """Under `mlflow run`, MLflow does not forward SIGTERM to the entry point: hpml asks the kernel for a
    SIGTERM when its parent dies (the MLproject command execs python, so the parent is mlflow run itself)."""
    out = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=open(out, "w"), env=env)
    deadline = time.time() + 60
    while "ready" not in out.read_text():
        assert time.time() < deadline, out.read_text()
        time.sleep(0.05)
    child_pid = int(out.read_text().split()[0])
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{child_pid}") and "Z" not in open(f"/proc/{child_pid}/stat").read().split()[2]:
        assert time.time() < deadline, "the child outlived its parent"
        time.sleep(0.05)
    assert "stopped by SIGTERM" in out.read_text()
