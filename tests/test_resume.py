"""Checkpoints and resume: a run killed with SIGKILL after a checkpoint, resumed, ends like an uninterrupted one."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

from click.testing import CliRunner
from mlflow import MlflowClient

from hpml import cli, tracking
from hpml.config import TrainConfig
from hpml.training import run_training

from conftest import REPO, with_venv_path

STEPS = 24  # long enough that the run cannot finish between seeing the first checkpoint and the kill


def cfg(sst2_dir, **kw):
    return TrainConfig(task="sst2", variant="fp32", model="random:tiny", data_dir=str(sst2_dir), max_steps=STEPS,
                       batch_size=4, eval_batch_size=16, max_length=32, purpose="test", experiment="hpml-sst2",
                       save_steps=2, save_total_limit=2, **kw)


def test_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted(sst2_dir, tracking_uri, tmp_path):
    reference = run_training(cfg(sst2_dir, register=False, output_dir=str(tmp_path / "ref")))["metrics"]
    assert not os.path.exists(tmp_path / "ref"), "a finished run deletes its checkpoints"

    args = ["train-sst2", "--variant", "fp32", "--model", "random:tiny", "--data-dir", str(sst2_dir), "--max-steps",
            str(STEPS), "--batch-size", "4", "--eval-batch-size", "16", "--max-length", "32", "--purpose", "test",
            "--save-steps", "2", "--save-total-limit", "2"]
    env = with_venv_path({**os.environ, "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen([sys.executable, "-m", "hpml.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not glob.glob(str(tmp_path / "hpml-checkpoints" / "*" / "checkpoint-*" / "hpml_loss.json")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("hpml-sst2").experiment_id],
                               filter_string="attributes.status = 'RUNNING'")
    run_id = run.info.run_id
    stale = CliRunner().invoke(cli.main, ["runs", "--stale"])
    assert stale.exit_code == 0 and run_id in stale.output
    assert client.get_run(run_id).info.status == "RUNNING"  # listing changes nothing
    marked = CliRunner().invoke(cli.main, ["runs", "--stale", "--mark"])
    assert marked.exit_code == 0 and "marked KILLED" in marked.output
    assert client.get_run(run_id).info.status == "KILLED"

    # The first session's training time travels in the checkpoint. Say it was long: the resumed run's
    # train_runtime_s must count it (it used to cover the resumed session only).
    [loss_file] = sorted(glob.glob(str(tmp_path / "hpml-checkpoints" / run_id / "checkpoint-*" / "hpml_loss.json")),
                         key=lambda p: int(p.split("checkpoint-")[1].split(os.sep)[0]))[-1:]
    saved = json.load(open(loss_file))
    assert saved["train_s"] > 0, saved
    json.dump({**saved, "train_s": 1000.0}, open(loss_file, "w"))

    result = CliRunner().invoke(cli.main, ["resume", "latest"])
    assert result.exit_code == 0, result.output
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED"
    resumed_at = int(after.data.tags[tracking.TAG_RESUMED_AT])
    assert 2 <= resumed_at < STEPS
    m = after.data.metrics
    # Exact resume on CPU: same weights, optimizer, scheduler, RNG and data position, so every final number
    # agrees to float32 rounding of the summed loss (observed: bit-identical); 1e-6 is that rounding's bound.
    for key in (tracking.M_ACCURACY, tracking.M_TRAIN_LOSS):
        assert abs(m[key] - reference[key]) <= 1e-6, (key, m[key], reference[key])
    assert 1000.0 < m[tracking.M_TRAIN_RUNTIME] < 1000.0 + 120, m[tracking.M_TRAIN_RUNTIME]
    # the loss curve continues past the resume point, at the right steps
    steps = {h.step for h in client.get_metric_history(run_id, "train_loss_running")}
    assert max(steps) == STEPS
    versions = client.search_model_versions("name='hpml-sst2-fp32'")
    assert [v.run_id for v in versions] == [run_id]
    assert not glob.glob(str(tmp_path / "hpml-checkpoints" / run_id)), "checkpoints deleted once FINISHED"
