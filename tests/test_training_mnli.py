"""An MNLI-format pair task end to end, as a newcomer would add one: generated data (hpml make-data), the
MLproject entry point, a registered champion that `hpml predict` and `mlflow models serve` answer with."""
import json
import os
import signal
import subprocess
import time
import urllib.request

import mlflow
import numpy as np
from click.testing import CliRunner
from mlflow import MlflowClient

from hpml import tracking
from hpml.cli import main
from hpml.data import mnli

from conftest import BIN, free_port, with_venv_path


def serve(model_uri: str, log_path):
    """`mlflow models serve --env-manager local` on a free port: (url, process)."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "-p", str(port)], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=with_venv_path(dict(os.environ)), start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, open(log_path).read()[-3000:]
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return url, proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("mlflow models serve did not answer /ping within 120 s")


def test_mnli_pairs_train_register_predict_and_serve(tracking_uri, tmp_path):
    data = tmp_path / "mnli"
    made = CliRunner().invoke(main, ["make-data", "mnli", "--out", str(data), "--train", "96", "--dev", "24"])
    assert made.exit_code == 0, made.output
    dev = mnli.read_tsv(str(data / "dev_matched.tsv"))
    assert sorted(set(dev["label"])) == [0, 1, 2]

    # In process: the MLproject entry point train_mnli is this command (tests/test_config.py checks they agree).
    trained = CliRunner().invoke(main, ["train-mnli", "--variant", "mnli-lora", "--model", "random:tiny", "--data-dir",
                                        str(data), "--max-steps", "3", "--batch-size", "8", "--max-length", "64",
                                        "--purpose", "test"])
    assert trained.exit_code == 0, trained.output
    assert "registered hpml-mnli-mnli-lora version 1 (champion)" in trained.stdout
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hpml-mnli").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_TASK] == "mnli"
    assert 0.0 <= run.data.metrics[tracking.M_ACCURACY] <= 1.0
    champion = client.get_model_version_by_alias("hpml-mnli-mnli-lora", tracking.CHAMPION)
    assert champion.run_id == run.info.run_id
    expected = json.load(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                  artifact_path="predictions.json")))
    assert len(expected) == 24 and {r["label"] for r in expected} <= {0, 1, 2}

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"premise": p, "hypothesis": h}) + "\n"
                             for p, h in zip(dev["premise"], dev["hypothesis"])))
    got = CliRunner().invoke(main, ["predict", "--model", "models:/hpml-mnli-mnli-lora@champion", "--file", str(pairs)])
    assert got.exit_code == 0, got.output
    rows = [json.loads(line) for line in got.stdout.splitlines()]
    assert [r["label"] for r in rows] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["probability"] for r in rows], [r["probability"] for r in expected], atol=1e-4)
    wrong = CliRunner().invoke(main, ["predict", "--model", "models:/hpml-mnli-mnli-lora@champion", "--text", "hi"])
    assert wrong.exit_code == 2
    assert wrong.stderr.strip().endswith("is a mnli model: pass --file with JSON lines holding 'premise', 'hypothesis'")

    url, proc = serve("models:/hpml-mnli-mnli-lora@champion", tmp_path / "serve.log")
    try:
        records = [{"premise": p, "hypothesis": h} for p, h in zip(dev["premise"][:6], dev["hypothesis"][:6])]
        req = urllib.request.Request(url + "/invocations", data=json.dumps({"dataframe_records": records}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            served = json.loads(resp.read())["predictions"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert [p["label"] for p in served] == [r["label"] for r in expected[:6]]
