"""Registered models answer like training did: `hpml predict` in a fresh process, `mlflow models serve`,
plain PEFT, a QLoRA adapter on CPU; bad names, bases and rows end in one clear line (HTTP 400 when served)."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from hpml import cli, serving, tracking, training
from hpml.tasks import get_task
from hpml.config import TrainConfig
from hpml.data import squad
from hpml.data.sst2 import read_tsv
from hpml.variants import Compile

from conftest import BIN, free_port, last_line, run_cmd, with_venv_path


# (task, variant): a LoRA adapter and a full fine-tune per task. b1 is LoRA + torch.compile; compile changes
# speed, not what is exported, and costs ~100 s cold on 2 CPU cores, so it is switched off here.
TRAINED = [("sst2", "lora"), ("sst2", "fp32"), ("squad", "b1"), ("squad", "a2")]


@dataclasses.dataclass
class Store:
    uri: str
    root: Path
    summaries: dict  # (task, variant) -> run_training's summary
    exports: dict  # (task, variant) -> the registered export folder, downloaded
    inputs: dict  # task -> JSON-lines file of the dev set (SQuAD rows carry their id)


def tiny_cfg(task, variant, sst2_dir, squad_dir):
    if task == "sst2":
        return TrainConfig(task="sst2", variant=variant, model="random:tiny", data_dir=str(sst2_dir), epochs=1,
                           batch_size=16, eval_batch_size=16, max_length=64, purpose="test")
    return TrainConfig(task="squad", variant=variant, model="random:tiny", data_dir=str(squad_dir), max_steps=4,
                       batch_size=8, eval_batch_size=16, max_length=128, doc_stride=32, purpose="test")


def without_compile(variant_id, task=None):
    v = training_get_variant(variant_id, task)
    return dataclasses.replace(v, compile=Compile()) if v.compile.enabled else v


training_get_variant = training.get_variant


@pytest.fixture(scope="module")
def store(tmp_path_factory, sst2_dir, squad_dir):
    """One SQLite store with the four trained, registered models (module scope: trained once, ~35 s)."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "HPML_CACHE_DIR": str(root / "cache")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    mp = pytest.MonkeyPatch()
    mp.setattr(training, "get_variant", without_compile)
    try:
        summaries, exports = {}, {}
        for task, variant in TRAINED:
            summaries[(task, variant)] = s = training.run_training(tiny_cfg(task, variant, sst2_dir, squad_dir))
            assert s["champion"] and s["version"] == 1
            exports[(task, variant)] = mlflow.artifacts.download_artifacts(
                f"runs:/{s['run_id']}/model/artifacts/export", dst_path=str(root / f"{task}-{variant}"))
        inputs = {"sst2": root / "sst2.jsonl", "squad": root / "squad.jsonl"}
        texts = read_tsv(str(sst2_dir / "dev.tsv"))["sentence"]
        inputs["sst2"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        dev = squad.load_squad(str(squad_dir), "validation")
        inputs["squad"].write_text("".join(json.dumps({k: r[k] for k in ("id", "question", "context")}) + "\n"
                                           for r in dev))
        yield Store(uri, root, summaries, exports, inputs)
    finally:
        mp.undo()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def in_store(store):
    """Point this process's MLflow at the module store (a function-scoped fixture may have moved it)."""
    os.environ["MLFLOW_TRACKING_URI"] = store.uri
    mlflow.set_tracking_uri(store.uri)


def artifact(store, key, name):
    in_store(store)
    path = mlflow.artifacts.download_artifacts(run_id=store.summaries[key]["run_id"], artifact_path=name)
    return json.load(open(path))


def hpml_predict(store, model, *args, env=None):
    """`hpml predict` in a fresh process against the module store: (JSON rows, completed process)."""
    out = run_cmd(["hpml", "predict", "--model", model, *args], env={"MLFLOW_TRACKING_URI": store.uri, **(env or {})},
                  timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()], out


@pytest.fixture(scope="module")
def cli_predictions(store):
    """Each champion's `hpml predict --file` over its task's dev set, computed once (fresh processes); one
    of them writes to --out instead of stdout."""
    got = {}
    for task, variant in TRAINED:
        out = store.root / f"predictions-{task}-{variant}.jsonl"
        args = ["--file", str(store.inputs[task])] + (["--out", str(out)] if variant == "fp32" else [])
        rows, _ = hpml_predict(store, f"models:/hpml-{task}-{variant}@champion", *args)
        if variant == "fp32":
            assert rows == [], "--out: nothing on stdout"
            rows = [json.loads(line) for line in out.read_text().splitlines()]
        got[(task, variant)] = rows
    return got


# ---- what was registered ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", TRAINED, ids=lambda k: "-".join(k))
def test_registered_version_is_safetensors_with_its_tags(store, key):
    task, variant = key
    export, summary = Path(store.exports[key]), store.summaries[key]
    meta = json.loads((export / serving.META_FILE).read_text())
    files = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))], "no pickled weights"
    assert "model/tokenizer.json" in files or "model/vocab.txt" in files
    if variant in ("lora", "b1"):
        assert meta["kind"] == "adapter" and meta["base_model"] == serving.BASE_DIR
        assert {"model/adapter_config.json", "model/adapter_model.safetensors", "base/model.safetensors",
                "base/config.json"} <= files
    else:
        assert meta["kind"] == "full" and {"model/model.safetensors", "model/config.json"} <= files
    in_store(store)
    mv = MlflowClient().get_model_version(f"hpml-{task}-{variant}", "1")
    headline = get_task(task).headline
    assert mv.tags[tracking.TAG_VARIANT] == variant and mv.tags["run_id"] == summary["run_id"]
    assert float(mv.tags[headline]) == pytest.approx(summary["metrics"][headline])
    assert mv.tags[tracking.TAG_PURPOSE] == "test" and mv.tags[tracking.TAG_FINGERPRINT]


# ---- fresh-process predictions equal those made at the end of training -----------------------------------
@pytest.mark.parametrize("variant", ["lora", "fp32"])
def test_sst2_champion_predicts_like_training(store, cli_predictions, variant):
    expected = artifact(store, ("sst2", variant), "predictions.json")
    got = cli_predictions[("sst2", variant)]
    assert len(got) == len(expected) == 48
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["probability"] for r in got], [r["probability"] for r in expected], atol=1e-4)


@pytest.mark.parametrize("variant", ["b1", "a2"])
def test_squad_champion_answers_like_training(store, cli_predictions, variant):
    expected = artifact(store, ("squad", variant), "predictions.json")
    null_odds = artifact(store, ("squad", variant), "null_odds.json")
    got = {r["id"]: r for r in cli_predictions[("squad", variant)]}
    assert got.keys() == expected.keys() and len(got) == 30
    same = sum(got[i]["answer"] == expected[i] for i in expected)
    if torch.cuda.is_available():
        # On CUDA, training evaluated under autocast in batches of other widths: a near-tie between two spans
        # may resolve the other way (seen: 1 question in 30 on an H100). On a CPU the answers are identical.
        assert same >= len(expected) - 2, same
    else:
        assert same == len(expected)
    np.testing.assert_allclose([got[i]["null_score"] - got[i]["score"] for i in expected],
                               [null_odds[i] for i in expected], atol=1e-3 if not torch.cuda.is_available() else 5e-2)


def test_single_question_from_the_command_line(store, cli_predictions):
    row = json.loads(store.inputs["squad"].read_text().splitlines()[0])
    (got,), out = hpml_predict(store, "models:/hpml-squad-b1/1", "--question", row["question"],
                               "--context", row["context"])
    want = next(r for r in cli_predictions[("squad", "b1")] if r["id"] == row["id"])
    assert got["answer"] == want["answer"]  # alone and in a batch of 30: scores equal up to float summation order
    assert (got["score"], got["null_score"]) == pytest.approx((want["score"], want["null_score"]), rel=1e-4, abs=1e-5)
    assert out.stdout.count("\n") == 1


# ---- adapters outside hpml, QLoRA on CPU, a base found elsewhere -----------------------------------------
def test_adapter_loads_with_plain_peft_and_predicts_the_same(store):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export = Path(store.exports[("sst2", "lora")])
    base = AutoModelForSequenceClassification.from_pretrained(export / "base", num_labels=2)
    model = PeftModel.from_pretrained(base, export / "model").eval()
    tok = AutoTokenizer.from_pretrained(export / "model")
    texts = [json.loads(ln)["text"] for ln in store.inputs["sst2"].read_text().splitlines()]
    with torch.inference_mode():
        probs = torch.softmax(model(**tok(texts, truncation=True, max_length=64, padding=True,
                                          return_tensors="pt")).logits, -1).numpy()
    expected = artifact(store, ("sst2", "lora"), "predictions.json")
    assert list(probs.argmax(-1)) == [r["label"] for r in expected]
    np.testing.assert_allclose(probs.max(-1), [r["probability"] for r in expected], atol=1e-4)


def register_copy(store, key, variant, edit, purpose="test"):
    """Register an edited copy of a trained export (as `variant`) in the module store."""
    src = store.exports[key]
    dst = store.root / f"edited-{variant}-{time.monotonic_ns()}"
    shutil.copytree(src, dst)
    meta = json.loads((dst / serving.META_FILE).read_text())
    (dst / serving.META_FILE).write_text(json.dumps({**meta, **edit, "variant": variant}))
    in_store(store)
    mlflow.set_experiment("hpml-serving-test")
    tags = {tracking.TAG_VARIANT: variant, tracking.TAG_PURPOSE: purpose, tracking.TAG_FINGERPRINT: "edited"}
    spec = get_task(key[0])
    name = tracking.registered_model_name(key[0], variant)
    with mlflow.start_run():
        version, _ = tracking.register_model(str(dst), name, serving.model_spec(spec, quantized=False),
                                             spec.headline, {spec.headline: 0.5}, tags)
    return name, version, dst


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback; on CUDA the 4-bit base loads")
def test_qlora_adapter_runs_on_cpu_over_the_full_precision_base(store, cli_predictions):
    """A QLoRA export (quantization nf4) on a machine without CUDA: one note, then the fp32 base's answers."""
    name, version, _ = register_copy(store, ("sst2", "lora"), "qlora", {"quantization": "nf4", "compute_dtype": "fp16"})
    got, out = hpml_predict(store, f"models:/{name}@champion", "--file", str(store.inputs["sst2"]))
    notes = [ln for ln in out.stderr.splitlines() if ln.startswith("note:")]
    assert notes == ["note: no CUDA here, so this QLoRA adapter runs on the full-precision base "
                     "(predictions differ slightly from the 4-bit base it was trained on)"]
    assert [r["label"] for r in got] == [r["label"] for r in cli_predictions[("sst2", "lora")]]


def test_missing_base_is_one_line_and_base_model_fixes_it(store, cli_predictions):
    # Its own registered name: under the champion rule a copy on other data would take lora's champion alias.
    name, version, dst = register_copy(store, ("sst2", "lora"), "lora-nobase",
                                       {"base_model": "hpml-tests/no-such-bert"}, purpose="demo")
    uri = f"models:/{name}/{version}"
    out = run_cmd(["hpml", "predict", "--model", uri, "--text", "a fine film"], env={"MLFLOW_TRACKING_URI": store.uri})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert last_line(out.stderr) == ("hpml: error: the adapter's base model 'hpml-tests/no-such-bert' cannot be "
                                     "found: pass --base-model PATH (or set HPML_BASE_MODEL) pointing at a local "
                                     "copy of it")
    # --base-model (here: the base folder of the original export) makes the same version answer.
    rows, _ = hpml_predict(store, uri, "--file", str(store.inputs["sst2"]), "--base-model", str(dst / "base"))
    assert rows == cli_predictions[("sst2", "lora")]


# ---- bad input on the command line -------------------------------------------------------------------------
def test_unknown_model_is_one_line_in_a_fresh_process(store):
    out = run_cmd(["hpml", "predict", "--model", "models:/hpml-squad-zz@champion", "--question", "q", "--context", "c"],
                  env={"MLFLOW_TRACKING_URI": store.uri})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert last_line(out.stderr) == (f"hpml: error: cannot load 'models:/hpml-squad-zz@champion' from {store.uri}: "
                                     "Registered Model with name=hpml-squad-zz not found "
                                     "(hpml models lists the registered names, versions and aliases)")


@pytest.mark.parametrize("args,code,message", [
    (["--model", "models:/hpml-sst2-lora@best", "--text", "x"], 1, "Registered model alias best not found"),
    (["--model", "models:/hpml-sst2-lora/9", "--text", "x"], 1, "(name=hpml-sst2-lora, version=9) not found"),
    (["--model", "models:/hpml-sst2-lora@champion", "--question", "q", "--context", "c"], 2,
     "models:/hpml-sst2-lora@champion is a sst2 model: pass --text"),
    (["--model", "models:/hpml-squad-a2@champion", "--question", "q"], 2, "--question and --context go together"),
    (["--model", "models:/hpml-squad-a2@champion", "--file", "{bad}"], 1, "input rows lack 'context': a squad model"),
    (["--model", "models:/hpml-squad-a2@champion", "--file", "{empty}"], 1, "input row 2: 'context' is empty"),
])
def test_bad_cli_input_is_one_line(store, args, code, message):
    in_store(store)
    bad, empty = store.root / "bad.jsonl", store.root / "empty.jsonl"
    bad.write_text('{"question": "who?"}\n')
    empty.write_text('{"question": "who?", "context": "Ann."}\n{"question": "who?", "context": "  "}\n')
    args = [a.format(bad=bad, empty=empty) for a in args]
    res = CliRunner().invoke(cli.main, ["predict", *args])
    assert res.exit_code == code, res.output
    assert last_line(res.stderr).startswith("hpml: error: ") and message in last_line(res.stderr)
    assert res.stdout == ""


# ---- mlflow models serve ---------------------------------------------------------------------------------
def post(url, payload):
    req = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def served(store):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on a free port; stopped afterwards."""
    procs = []

    def start(model_uri):
        port = free_port()
        log = open(store.root / f"serve-{port}.log", "w")
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "--host", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=with_venv_path({**os.environ, "MLFLOW_TRACKING_URI": store.uri}),
                                start_new_session=True)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (store.root / f"serve-{port}.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow models serve did not answer /ping within 120 s")

    yield start
    for proc in procs:
        if proc.poll() is not None:
            continue  # already gone (it failed to start): its log is in the assertion above
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_served_qa_adapter_answers_like_hpml_predict_and_rejects_bad_rows(store, cli_predictions, served):
    url = served("models:/hpml-squad-b1@champion")
    rows = [json.loads(ln) for ln in store.inputs["squad"].read_text().splitlines()][:8]
    records = [{"question": r["question"], "context": r["context"]} for r in rows]
    status, body = post(url, {"dataframe_records": records})
    assert status == 200, body
    want = {r["id"]: r for r in cli_predictions[("squad", "b1")]}
    for r, got in zip(rows, body["predictions"]):
        assert got["answer"] == want[r["id"]]["answer"]
        assert got["score"] == pytest.approx(want[r["id"]]["score"], abs=1e-5)
        assert got["null_score"] == pytest.approx(want[r["id"]]["null_score"], abs=1e-5)
    # A row without `context`: MLflow's schema check; a null one: hpml's check. Both are 400 with a message.
    status, body = post(url, {"dataframe_records": [{"question": "who?"}]})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "missing inputs ['context']" in body["message"]
    records = [{"question": "who?", "context": "Ann."}, {"question": "who?", "context": None}]
    status, body = post(url, {"dataframe_records": records})
    assert status == 400 and "input row 2: 'context' is missing (null)" in body["message"]


def test_served_sst2_model_answers_like_hpml_predict(store, cli_predictions, served):
    url = served("models:/hpml-sst2-fp32@champion")
    texts = [json.loads(ln)["text"] for ln in store.inputs["sst2"].read_text().splitlines()][:8]
    status, body = post(url, {"dataframe_records": [{"text": t} for t in texts]})
    assert status == 200, body
    want = cli_predictions[("sst2", "fp32")][:8]
    assert [p["label"] for p in body["predictions"]] == [w["label"] for w in want]
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], [w["probability"] for w in want],
                               atol=1e-6)


# ---- self-contained: only the logged requirements and the code that travels with the model ---------------
ONLY_REQUIREMENTS = r"""
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps(model.predict(pd.DataFrame(json.loads(sys.argv[2]))).to_dict("records")))
"""


def requirements_only_site(model_dir: Path, out: Path) -> Path:
    """A site folder holding only the distributions the model's requirements.txt names and what those declare
    they need (symlinks into this venv): what `pip install -r requirements.txt` gives a fresh environment,
    without the download. hpml is not among them; it must come from the model's own code folder."""
    import importlib.metadata as md
    import re

    def name_of(req: str) -> str:
        return re.sub(r"[-_.]+", "-", re.split(r"[\s=<>!~\[;(]", req.strip(), maxsplit=1)[0]).lower()

    lines = (model_dir / "requirements.txt").read_text().splitlines()
    todo, dists = [name_of(ln) for ln in lines if ln.strip() and not ln.startswith(("#", "-"))], {}
    while todo:
        name = todo.pop()
        if name in dists:
            continue
        try:
            dists[name] = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a platform-conditional need absent here (e.g. pywin32)
        todo += [name_of(r) for r in dists[name].requires or [] if "extra ==" not in r]
    out.mkdir()
    site = Path(md.distribution("mlflow").locate_file(""))
    tops = {Path(str(f)).parts[0] for d in dists.values() for f in d.files or [] if not str(f).startswith("..")}
    for top in sorted(tops - {"__pycache__"}):
        if (site / top).exists() and not top.endswith(".pth"):
            (out / top).symlink_to(site / top)
    assert "hpml" not in tops and not (out / "hpml").exists()
    return out


def test_registered_model_predicts_with_only_its_logged_requirements(store, tmp_path):
    """A self-contained model: `python -S` (no site-packages) over a folder of just the logged requirements and
    their declared dependencies loads the registered version with mlflow.pyfunc and predicts what the full
    environment predicts. (SQuAD: its postprocessing is the most hpml code that must travel; ~30 s.)"""
    in_store(store)
    task, variant = "squad", "a2"
    rows = [{"question": "Who wrote it?", "context": "The book was written by Ada in 1843."}]
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/hpml-{task}-{variant}/1",
                                                         dst_path=str(tmp_path / "model")))
    site = requirements_only_site(model_dir, tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=str(site), HOME=str(tmp_path), PYTHONNOUSERSITE="1")
    out = subprocess.run([sys.executable, "-S", "-c", ONLY_REQUIREMENTS, str(model_dir), json.dumps(rows)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame(rows)).to_dict("records")
    rounded = lambda recs: [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in recs]
    assert rounded(got) == rounded(expected) and len(got) == len(rows)
