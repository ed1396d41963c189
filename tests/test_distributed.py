"""Data-parallel training on CPU (2 workers, gloo): one MLflow run, rank 0 alone tracks, same numbers as 1 process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import BIN, LEAKY_ENV, last_line, minilm_or_skip, mlflow_run, run_cmd, with_venv_path


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    """A random 2-layer BERT with dropout off, so two ranks (each with its own dropout RNG) and one process
    compute exactly the same function; DDP's gradient mean then equals the single-process batch mean."""
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from hpml.modeling import BERT_VOCAB_SIZE, RANDOM_SIZES

    out = tmp_path_factory.mktemp("bert-nodropout")
    config = BertConfig(vocab_size=BERT_VOCAB_SIZE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        **RANDOM_SIZES["tiny"])
    import torch

    torch.manual_seed(0)
    BertForQuestionAnswering(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_or_skip()).save_pretrained(out)
    return out


def train_args(model, data, nproc: int, steps: int, register: str = "true") -> list[str]:
    return ["hpml", "train-squad", "--variant", "a2", "--model", str(model), "--data-dir", str(data),
            "--max-steps", str(steps), "--batch-size", "8", "--eval-batch-size", "16", "--max-length", "128",
            "--doc-stride", "48", "--lr", "1e-3", "--purpose", "test", "--register", register, "--nproc", str(nproc)]


def finished_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_two_gloo_workers_make_one_run_with_single_process_numbers(no_dropout_model, squad_dir, tracking_uri):
    single = run_cmd(train_args(no_dropout_model, squad_dir, 1, 6, register="false"))
    assert single.returncode == 0, single.stderr[-3000:]
    # Under `mlflow run` (the run exists before hpml starts): the entry point starts the workers, rank 0 joins.
    args = train_args(no_dropout_model, squad_dir, 2, 6)[2:]
    params = {args[i][2:].replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}
    double = mlflow_run("train_squad", params, experiment="hpml-squad")
    assert double.returncode == 0, double.stderr[-3000:]

    runs = {r.data.params["nproc"]: r for r in finished_runs()}
    assert len(finished_runs()) == 2, "rank 1 must never create a run"
    one, two = runs["1"], runs["2"]
    assert two.info.status == "FINISHED" and two.data.params["resolved.nproc"] == "2"
    # The same global batches (accelerate shards the single-process batch order) and, without dropout, the same
    # gradients up to float summation order: 1e-4 relative covers fp32 all-reduce rounding over 6 Adam steps.
    assert two.data.metrics["train_loss"] == pytest.approx(one.data.metrics["train_loss"], rel=1e-4)
    for key in ("eval_exact", "eval_f1", "eval_HasAns_f1", "eval_NoAns_exact", "eval_total"):
        assert two.data.metrics[key] == pytest.approx(one.data.metrics[key], abs=1e-6), key
    # Evaluation gathered every feature once, in dataset order: the same predictions, question by question.
    client = MlflowClient()
    preds = [json.load(open(client.download_artifacts(r.info.run_id, "predictions.json"))) for r in (one, two)]
    assert preds[0] == preds[1]
    versions = client.search_model_versions("name='hpml-squad-a2'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", two.info.run_id)]


def test_a_dying_rank_fails_the_run_in_one_line_and_registers_nothing(no_dropout_model, squad_dir, tracking_uri):
    env = with_venv_path({k: v for k, v in os.environ.items() if k not in LEAKY_ENV})
    args = train_args(no_dropout_model, squad_dir, 2, 100000)
    proc = subprocess.Popen([str(BIN / "hpml"), *args[1:]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Kill rank 1 once rank 0 has opened the run and both train: rank 1 is the worker whose RANK is 1.
        deadline, victim = time.time() + 240, None
        while time.time() < deadline and victim is None and proc.poll() is None:
            time.sleep(0.5)
            runs = finished_runs()
            if runs and runs[0].data.metrics.get("trainable_params"):
                victim = _worker_pid(rank=1, ancestor=proc.pid)
        assert victim is not None, "the job never reached training"
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:  # a failed assertion must not leave a 100,000-step job training (workers run in their own sessions)
        _kill_tree(proc.pid)
    assert proc.returncode != 0
    line = last_line(err)
    assert line.startswith("hpml: error: data-parallel training failed: rank 1: killed by SIGKILL"), err[-2000:]
    assert "Traceback" not in err
    (run,) = finished_runs()
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "rank 1: killed by SIGKILL"
    assert MlflowClient().search_model_versions("name='hpml-squad-a2'") == []


def _worker_pid(rank: int, ancestor: int):
    """The PID of the training worker with this RANK among `ancestor`'s descendants (read from /proc: the
    elastic agent's children; another job on the machine, e.g. a parallel test, is never picked)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if (env.get(b"RANK") == str(rank).encode() and env.get(b"HPML_LAUNCH_DIR") and env.get(b"WORLD_SIZE") == b"2"
                and _descends_from(int(pid), ancestor)):
            return int(pid)
    return None


def _kill_tree(root: int) -> None:
    doomed = [int(p) for p in filter(str.isdigit, os.listdir("/proc")) if _descends_from(int(p), root)]
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state is the parent PID
        except (OSError, ValueError, IndexError):
            return False
    return False


def _gpus_fewer_than(n: int):
    """On a CUDA machine with fewer GPUs than processes, the refusal is the GPU count (checked first)."""
    import torch

    return pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < n,
                              reason=f"this CUDA machine has fewer than {n} GPUs: that refusal comes first")


@pytest.mark.parametrize("task,extra,expected", [
    ("squad", ["--variant", "a2", "--nproc", "0"], "nproc must be >= 1"),
    pytest.param("squad", ["--variant", "a2", "--nproc", "2", "--batch-size", "9"], "must divide evenly over nproc=2",
                 marks=_gpus_fewer_than(2)),
    pytest.param("squad", ["--variant", "a2", "--nproc", "4", "--eval-batch-size", "2"],
                 "at least one feature per process", marks=_gpus_fewer_than(4)),
    ("sst2", ["--variant", "qlora", "--nproc", "2"], "cannot train data-parallel: run it with nproc=1"),
])
def test_what_cannot_run_data_parallel_is_refused_in_one_line(task, extra, expected, empty_tracking_uri):
    from click.testing import CliRunner

    from hpml.cli import main

    result = CliRunner().invoke(main, [f"train-{task}", "--model", "random:tiny", *extra])
    assert result.exit_code == 2
    assert result.output.strip().startswith("hpml: error:") and expected in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(empty_tracking_uri.removeprefix("sqlite:///")), "refused before the store was touched"
