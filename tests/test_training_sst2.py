"""train_sst2 end to end: metrics logged, model registered and reloadable, bad inputs leave nothing behind."""
import json
import os

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from hpml import tracking
from hpml.config import TrainConfig
from hpml.training import run_training

from conftest import SST2_REAL, last_line, minilm_or_skip, mlflow_run, run_cmd

COMMON = [tracking.M_TRAIN_LOSS, tracking.M_TRAIN_RUNTIME, tracking.M_TRAIN_SPS, tracking.M_EVAL_RUNTIME,
          tracking.M_EVAL_SPS, tracking.M_EVAL_MS, tracking.M_TRAINABLE, tracking.M_TOTAL, tracking.M_TRAINABLE_PCT,
          tracking.M_TRAINABLE_PCT_FULL]
VRAM = [tracking.M_PEAK_TRAIN_ALLOC, tracking.M_PEAK_TRAIN_RESERVED, tracking.M_VRAM_AFTER_LOAD,
        tracking.M_PEAK_EVAL_VRAM]


def tiny(variant, sst2_dir, **kw):
    return TrainConfig(task="sst2", variant=variant, model="random:tiny", data_dir=str(sst2_dir), epochs=1,
                       batch_size=16, eval_batch_size=16, max_length=64, purpose="test", experiment="hpml-sst2", **kw)


def finished_runs(client):
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(exps) if r.info.status == "FINISHED"]


def test_fp32_run_logs_everything_and_registers(sst2_dir, tracking_uri):
    summary = run_training(tiny("FP32", sst2_dir))
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "fp32"
    m = run.data.metrics
    for key in COMMON + [tracking.M_ACCURACY]:
        assert key in m, key
    on_cuda = torch.cuda.is_available()
    assert all((k in m) == on_cuda for k in VRAM), "VRAM metrics on CUDA; absent on CPU, not zero"
    assert 0.0 <= m[tracking.M_ACCURACY] <= 1.0
    assert m[tracking.M_TRAINABLE] == m[tracking.M_TOTAL] and m[tracking.M_TRAINABLE_PCT] == 100.0
    # per-epoch accuracy is a history keyed by epoch, plus the final value
    assert [h.step for h in client.get_metric_history(run.info.run_id, tracking.M_ACCURACY)][0] == 1
    tags = run.data.tags
    assert tags[tracking.TAG_VARIANT] == "fp32" and tags[tracking.TAG_TASK] == "sst2"
    assert tags[tracking.TAG_PURPOSE] == "test" and len(tags[tracking.TAG_FINGERPRINT]) == 16
    assert tags[tracking.TAG_DEVICE] == tracking.device_name() and tags["version.torch"] and tags[tracking.TAG_GIT_COMMIT]
    p = run.data.params
    assert p["resolved.lr"] == "2e-05" and p["resolved.precision"] == "fp32" and p["variant.trainable.mode"] == "full"
    # what really ran, read from the trained model and the Trainer's wrapper
    assert (tags[tracking.TAG_PRECISION], tags[tracking.TAG_ATTENTION], tags[tracking.TAG_COMPILED]) == (
        "fp32", "sdpa", "no")
    mv = client.get_model_version_by_alias("hpml-sst2-fp32", tracking.CHAMPION)
    assert str(mv.version) == "1" and mv.run_id == run.info.run_id and mv.tags[tracking.TAG_VARIANT] == "fp32"
    assert float(mv.tags[tracking.M_ACCURACY]) == m[tracking.M_ACCURACY]


def test_lora_trains_exactly_adapters_and_head_and_reloads(sst2_dir, tracking_uri, tmp_path):
    import mlflow
    from peft import LoraConfig, TaskType, get_peft_model

    from hpml.modeling import materialize_random
    from hpml.tasks import get_task

    spec = get_task("sst2")
    summary = run_training(tiny("lora", sst2_dir))
    # PEFT's own count on the same architecture: adapters on query/value + the classifier head
    base = spec.model_class().from_pretrained(materialize_random("random:tiny", spec, str(tmp_path / "b"), 0))
    peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32,
                                                 target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    run = MlflowClient().get_run(summary["run_id"])
    assert run.data.metrics[tracking.M_TRAINABLE] == trainable
    assert run.data.metrics[tracking.M_TOTAL] == total
    # adapters: 2 layers x 2 modules x (r x 128 + 128 x r); head: 128 x 2 + 2 (+ dense pooler-free head)
    assert trainable < total * 0.2
    # the registered adapter, loaded back, predicts what the run predicted at the end of training
    local = mlflow.artifacts.download_artifacts(run_id=summary["run_id"], artifact_path="predictions.json")
    expected = json.load(open(local))
    model = mlflow.pyfunc.load_model("models:/hpml-sst2-lora@champion")
    from hpml.data.sst2 import read_tsv

    dev = read_tsv(str(sst2_dir / "dev.tsv"))
    import pandas as pd

    got = model.predict(pd.DataFrame({"text": dev["sentence"]}))
    assert list(got["label"]) == [r["label"] for r in expected]
    np.testing.assert_allclose(got["probability"], [r["probability"] for r in expected], atol=1e-4)
    export = mlflow.artifacts.download_artifacts(f"runs:/{summary['run_id']}/model/artifacts/export")
    assert os.path.isfile(os.path.join(export, "model", "adapter_config.json"))
    assert os.path.isfile(os.path.join(export, "model", "adapter_model.safetensors"))
    assert_loads_without_hpml_installed("models:/hpml-sst2-lora@champion", dev["sentence"][:4],
                                        [r["label"] for r in expected[:4]])


# A process in which hpml cannot be imported: the editable install's finder and path entries of this
# checkout are removed before anything else runs. The model must bring hpml itself (code_paths).
_NO_HPML = """
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if p.rstrip("/") not in {roots!r}]
assert importlib.util.find_spec("hpml") is None, "hpml is still importable"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model({uri!r})
print(json.dumps(model.predict(pd.DataFrame({{"text": {texts!r}}}))["label"].tolist()))
print(json.dumps(sorted(m for m in sys.modules if m == "hpml" or m.startswith("hpml."))[:1]))
"""


def assert_loads_without_hpml_installed(uri: str, texts: list, labels: list) -> None:
    """The registered model loads and predicts where hpml is not installed: only its logged requirements."""
    import subprocess
    import sys

    import hpml
    from conftest import REPO

    roots = (str(REPO), os.path.dirname(os.path.dirname(hpml.__file__)), os.getcwd())
    code = _NO_HPML.format(roots=roots, uri=uri, texts=list(texts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    got, loaded_from = out.stdout.strip().splitlines()[-2:]
    assert json.loads(got) == labels
    assert json.loads(loaded_from) == ["hpml"]  # imported, from the model's own code copy


def assert_nothing_written(client):
    assert finished_runs(client) == []
    assert client.search_registered_models() == []


@pytest.mark.parametrize("problem,args,code,message", [
    ("bad-label", [], 1, "dev.tsv:3: expected 'sentence<TAB>0|1'"),
    ("no-model", ["--model", "/nonexistent/bert"], 1, "model path '/nonexistent/bert' does not exist"),
    pytest.param("qlora", ["--variant", "qlora"], 2, "variant qlora needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal")),
])
def test_bad_inputs_end_in_one_line_and_leave_nothing(problem, args, code, message, sst2_dir, tracking_uri, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text((sst2_dir / "train.tsv").read_text())
    dev = (sst2_dir / "dev.tsv").read_text().splitlines()
    if problem == "bad-label":
        dev[2] = dev[2].rsplit("\t", 1)[0] + "\tpositive"
    (data / "dev.tsv").write_text("\n".join(dev) + "\n")
    base = ["hpml", "train-sst2", "--variant", "fp32", "--model", "random:tiny", "--data-dir", str(data),
            "--max-steps", "1", "--purpose", "test"]
    out = run_cmd(base + args, cwd=tmp_path)
    assert out.returncode == code, out.stderr
    assert message in last_line(out.stderr) and last_line(out.stderr).startswith("hpml: error: ")
    assert "Traceback" not in out.stderr
    assert_nothing_written(MlflowClient(tracking_uri))


def test_mlflow_run_with_a_bad_file_ends_failed(sst2_dir, tracking_uri, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("text\tlabel\nfine\t1\n")
    (data / "dev.tsv").write_text((sst2_dir / "dev.tsv").read_text())
    out = mlflow_run("train_sst2", {"variant": "fp32", "model": "random:tiny", "data_dir": data, "purpose": "test"},
                     experiment="hpml-sst2")
    assert out.returncode != 0
    assert "hpml: error: " in out.stderr and "expected 'sentence<TAB>label'" in out.stderr
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("hpml-sst2").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []


@pytest.mark.slow
@pytest.mark.skipif(not SST2_REAL.exists(), reason="../shared/data/sst2 is absent (real-data accuracy test)")
@pytest.mark.learning
def test_real_sst2_with_minilm_through_mlflow_run(tracking_uri, tmp_path):
    """all-MiniLM-L6-v2 on the first 4,000 real SST-2 rows, 1 epoch, full dev set: a real accuracy check.

    The bar, 0.80, sits below this recipe's whole measured seed spread with margin: over ten seeded runs on
    the H100 (benchmarks/sst2_seeds.py, docs/benchmarks.md) accuracy was 0.833-0.851, and on this CPU seeds
    42/1/2 gave 0.825/0.845/0.829; the issue's measured spread is 0.826-0.851. So any seed passes, and no seed
    is chosen because it passes (this runs the declared default seed). A broken pipeline (labels, head,
    schedule, tokenization) stays near 0.5; the study's own slower recipe (lr 2e-5) gets ~0.79-0.80.
    register=false: the registry path is covered on tiny models; this test is about accuracy."""
    minilm_or_skip()
    data = tmp_path / "sst2"
    data.mkdir()
    lines = (SST2_REAL / "train.tsv").read_text().splitlines(keepends=True)
    (data / "train.tsv").write_text("".join(lines[:4001]))
    (data / "dev.tsv").write_text((SST2_REAL / "dev.tsv").read_text())
    # lr 1e-4: at the study's 2e-5 one epoch of 4,000 rows reaches only ~0.80 (CONVENTIONS.md)
    out = mlflow_run("train_sst2", {"variant": "fp32", "model": "minilm", "data_dir": data, "epochs": 1,
                                    "max_train_samples": 4000, "lr": "1e-4", "purpose": "test", "register": "false"},
                     experiment="hpml-sst2")
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hpml-sst2").experiment_id])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    print(f"real SST-2 dev accuracy {m[tracking.M_ACCURACY]:.4f}")  # shown with pytest -rP
    assert m[tracking.M_ACCURACY] >= 0.80, m[tracking.M_ACCURACY]
    for key in COMMON:
        assert key in m, key
    assert m[tracking.M_TOTAL] == 22_713_986  # MiniLM-L6 (22.7M) + a 2-way classifier head
    assert run.data.params["variant"] == "fp32" and run.data.params["resolved.max_train_samples"] == "4000"
