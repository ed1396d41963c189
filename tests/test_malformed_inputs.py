"""The malformed-input corpus: every bad parameter, data file, model reference, predict input, score file and
payload ends in ONE line on stderr, a non-zero exit, no traceback, and no run or registry version left.

All cases run in-process (click's CliRunner) against one SQLite store shared by the module: a case that left a
run or a version behind would show up in the store's counts after it.
"""
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from hpml import cli


NON_UTF8 = "caf\xe9".encode("latin-1")  # 0xe9 alone is not UTF-8


@pytest.fixture(scope="module")
def world(tmp_path_factory, sst2_dir, squad_dir):
    """Good data, one export folder, a pile of broken files and the store every case runs against."""
    root = tmp_path_factory.mktemp("malformed")
    w = {"root": root, "sst2": str(sst2_dir), "squad": str(squad_dir), "uri": f"sqlite:///{root / 'store.db'}"}

    def sst2_variant(name, train=None, dev=None):
        d = root / f"sst2-{name}"
        shutil.copytree(sst2_dir, d)
        for fname, content in (("train.tsv", train), ("dev.tsv", dev)):
            if content is not None:
                (d / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(d)

    good_train = (sst2_dir / "train.tsv").read_bytes()
    w["sst2_bad"] = {
        "bad header": sst2_variant("hdr", train="text\tlabel\na\t1\n"),
        "label 2": sst2_variant("lbl", train="sentence\tlabel\ngood film\t2\n"),
        "three columns": sst2_variant("cols", train="sentence\tlabel\ngood\tfilm\t1\n"),
        "no rows": sst2_variant("norows", train="sentence\tlabel\n"),
        "empty file": sst2_variant("empty", train=""),
        "non-UTF-8 train": sst2_variant("enc", train=good_train + NON_UTF8 + b"\t1\n"),
        "non-UTF-8 dev": sst2_variant("encdev", dev=b"sentence\tlabel\n" + NON_UTF8 + b"\t0\n"),
        "non-UTF-8 header": sst2_variant("enchdr", train=b"sent\xffnce\tlabel\na\t1\n"),
        "label words": sst2_variant("words", dev="sentence\tlabel\nnice\tpositive\n"),
    }
    missing_dev = root / "sst2-nodev"
    shutil.copytree(sst2_dir, missing_dev)
    (missing_dev / "dev.tsv").unlink()
    w["sst2_bad"]["missing dev.tsv"] = str(missing_dev)
    dir_as_file = root / "sst2-dirfile"
    shutil.copytree(sst2_dir, dir_as_file)
    (dir_as_file / "train.tsv").unlink()
    (dir_as_file / "train.tsv").mkdir()
    w["sst2_bad"]["train.tsv is a folder"] = str(dir_as_file)

    dev = json.loads((squad_dir / "dev-v2.0.json").read_text())

    def squad_doc(mutate):
        doc = json.loads(json.dumps(dev))
        mutate(doc)
        return doc

    def dup(doc):
        p = doc["data"][0]["paragraphs"][0]
        p["qas"].append(dict(p["qas"][0]))

    def wrong_start(doc):
        q = next(q for p in doc["data"][0]["paragraphs"] for q in p["qas"] if q["answers"])
        q["answers"][0]["answer_start"] += 1

    def impossible_with_answer(doc):
        q = next(q for p in doc["data"][0]["paragraphs"] for q in p["qas"] if q["answers"])
        q["is_impossible"] = True

    def string_start(doc):
        q = next(q for p in doc["data"][0]["paragraphs"] for q in p["qas"] if q["answers"])
        q["answers"][0]["answer_start"] = str(q["answers"][0]["answer_start"])

    def set_path(path, value):
        def f(doc):
            obj = doc
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = value
        return f

    def del_path(path):
        def f(doc):
            obj = doc
            for k in path[:-1]:
                obj = obj[k]
            del obj[path[-1]]
        return f

    squad_files = {
        "not JSON": b"{\"data\": [",
        "non-UTF-8": json.dumps(dev).encode()[:50] + b"\xff\xfe" + json.dumps(dev).encode()[50:],
        "top-level list": json.dumps([dev]).encode(),
        "no data key": json.dumps({"version": "v2.0"}).encode(),
        "paragraphs not a list": json.dumps(squad_doc(set_path(["data", 0, "paragraphs"], "x"))).encode(),
        "context a number": json.dumps(squad_doc(set_path(["data", 0, "paragraphs", 0, "context"], 7))).encode(),
        "question without id": json.dumps(squad_doc(del_path(["data", 0, "paragraphs", 0, "qas", 0, "id"]))).encode(),
        "duplicate question id": json.dumps(squad_doc(dup)).encode(),
        "answer_start off": json.dumps(squad_doc(wrong_start)).encode(),
        "is_impossible with answers": json.dumps(squad_doc(impossible_with_answer)).encode(),
        "answer_start a string": json.dumps(squad_doc(string_start)).encode(),
        "no questions": json.dumps({"data": []}).encode(),
        "empty file": b"",
    }
    w["squad_bad"] = {}
    for i, (name, content) in enumerate(squad_files.items()):
        d = root / f"squad-{i}"
        shutil.copytree(squad_dir, d)
        (d / "dev-v2.0.json").write_bytes(content)
        w["squad_bad"][name] = str(d)
    w["squad_bad_train"] = root / "squad-badtrain"
    shutil.copytree(squad_dir, w["squad_bad_train"])
    (w["squad_bad_train"] / "train-v2.0.json").write_bytes(squad_files["duplicate question id"])

    # score inputs
    w["dev_json"] = str(squad_dir / "dev-v2.0.json")
    ids = [q["id"] for a in dev["data"] for p in a["paragraphs"] for q in p["qas"]]
    files = {
        "preds.json": json.dumps({i: "" for i in ids}),
        "preds_list.json": json.dumps(list(ids)),
        "preds_int.json": json.dumps({i: 3 for i in ids}),
        "preds_bad.json": "{\"a\": ",
        "na_str.json": json.dumps({i: "0.5" for i in ids}),
        "na_bool.json": json.dumps({i: True for i in ids}),
        "dup_dev.json": squad_files["duplicate question id"].decode(),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "preds_enc.json").write_bytes(b"{\"" + NON_UTF8 + b"\": \"x\"}")
    (root / "a_file").write_text("not a folder")

    # predict inputs: an hpml export folder of a tiny random SST-2 model (no training needed to predict)
    from hpml import export, modeling
    from hpml.tasks import get_task
    from hpml.variants import get_variant

    variant, spec = get_variant("fp32", "sst2"), get_task("sst2")
    built = modeling.apply_techniques(variant, spec, "random:tiny", str(root / "work"), 0, "cpu")
    w["export"] = export.write_export(str(root / "export"), built.model, built.tokenizer, spec=spec,
                                      variant=variant, base_ref=built.base_path, base_is_local_copy=True,
                                      settings={"max_length": 64})
    jsonl = {
        "no_text.jsonl": '{"sentence": "good"}\n',
        "null_text.jsonl": '{"text": null}\n',
        "number_text.jsonl": '{"text": 5}\n',
        "list_text.jsonl": '{"text": ["a", "b"]}\n',
        "dict_text.jsonl": '{"text": {"a": 1}}\n',
        "bad_line.jsonl": '{"text": "good"}\n{"text": \n',
        "array_line.jsonl": '["good"]\n',
        "blank.jsonl": "\n\n",
        "qa_rows.jsonl": '{"question": "q?", "context": "c"}\n',
    }
    for name, text in jsonl.items():
        (root / name).write_text(text)
    (root / "enc.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "' + NON_UTF8 + b'"}\n')

    # model folders
    (root / "model-noconfig").mkdir()
    (root / "model-badconfig").mkdir()
    (root / "model-badconfig" / "config.json").write_text("{not json")
    short = root / "model-short"
    modeling.materialize_random("random:tiny", "sst2", str(short), 0)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 32
    (short / "config.json").write_text(json.dumps(cfg))
    w["short_model"] = str(short)
    return w


def sst2_args(w, *extra):
    return ["train-sst2", "--variant", "fp32", "--model", "random:tiny", "--data-dir", w["sst2"], "--max-steps",
            "1", "--max-length", "32", "--purpose", "test", *extra]


def squad_args(w, *extra):
    return ["train-squad", "--variant", "a2", "--model", "random:tiny", "--data-dir", w["squad"], "--max-steps",
            "1", "--max-length", "128", "--doc-stride", "32", "--purpose", "test", *extra]


def predict_args(w, *extra):
    return ["predict", "--model", w["export"], *extra]


R = "{root}"  # placeholder for the module's folder, filled in at run time

CASES = {
    # ---- training parameters (SST-2) --------------------------------------------------------------------
    "epochs -1": lambda w: sst2_args(w, "--epochs", "-1", "--max-steps", "0"),
    "epochs 0": lambda w: sst2_args(w, "--epochs", "0", "--max-steps", "0"),
    "epochs nan": lambda w: sst2_args(w, "--epochs", "nan", "--max-steps", "0"),
    "epochs inf": lambda w: sst2_args(w, "--epochs", "inf", "--max-steps", "0"),
    "epochs words": lambda w: sst2_args(w, "--epochs", "two"),
    "max_steps -1": lambda w: sst2_args(w, "--max-steps", "-1"),
    "max_steps float": lambda w: sst2_args(w, "--max-steps", "1.5"),
    "batch_size 0": lambda w: sst2_args(w, "--batch-size", "0"),
    "batch_size -4": lambda w: sst2_args(w, "--batch-size", "-4"),
    "batch_size words": lambda w: sst2_args(w, "--batch-size", "abc"),
    "eval_batch_size 0": lambda w: sst2_args(w, "--eval-batch-size", "0"),
    "eval_batch_size -1": lambda w: sst2_args(w, "--eval-batch-size", "-1"),
    "max_train_samples -1": lambda w: sst2_args(w, "--max-train-samples", "-1"),
    "max_eval_samples -5": lambda w: sst2_args(w, "--max-eval-samples", "-5"),
    "lr negative": lambda w: sst2_args(w, "--lr", "-1e-5"),
    "lr 0": lambda w: sst2_args(w, "--lr", "0"),
    "lr words": lambda w: sst2_args(w, "--lr", "fast"),
    "lr nan": lambda w: sst2_args(w, "--lr", "nan"),
    "lr inf": lambda w: sst2_args(w, "--lr", "inf"),
    "max_length 2": lambda w: sst2_args(w, "--max-length", "2"),
    "max_length 0": lambda w: sst2_args(w, "--max-length", "0"),
    "max_length -1": lambda w: sst2_args(w, "--max-length", "-1"),
    "max_length 100000": lambda w: sst2_args(w, "--max-length", "100000"),
    "max_length 513": lambda w: sst2_args(w, "--max-length", "513"),
    "max_length past a local model": lambda w: sst2_args(w, "--model", w["short_model"], "--max-length", "64"),
    "seed -1": lambda w: sst2_args(w, "--seed", "-1"),
    "seed 2**32": lambda w: sst2_args(w, "--seed", str(2**32)),
    "register maybe": lambda w: sst2_args(w, "--register", "maybe"),
    "purpose prod": lambda w: sst2_args(w, "--purpose", "prod"),
    "unknown variant": lambda w: sst2_args(w, "--variant", "zz9"),
    "squad variant on sst2": lambda w: sst2_args(w, "--variant", "a1"),
    "cuda-only variant on cpu": lambda w: sst2_args(w, "--variant", "qlora"),
    "save_steps -1": lambda w: sst2_args(w, "--save-steps", "-1"),
    "save_total_limit -1": lambda w: sst2_args(w, "--save-total-limit", "-1"),
    "output_dir is a file": lambda w: sst2_args(w, "--output-dir", str(w["root"] / "a_file")),
    "output_dir under a file": lambda w: sst2_args(w, "--output-dir", str(w["root"] / "a_file" / "ckpt")),
    "unknown option": lambda w: sst2_args(w, "--epoch", "1"),
    "missing variant": lambda w: ["train-sst2", "--data-dir", w["sst2"]],
    "resume unknown run": lambda w: sst2_args(w, "--resume", "0123456789abcdef0123456789abcdef"),
    "resume latest on an empty store": lambda w: sst2_args(w, "--resume", "latest"),
    # ---- training parameters (SQuAD) --------------------------------------------------------------------
    "doc_stride = max_length": lambda w: squad_args(w, "--doc-stride", "128"),
    "doc_stride > max_length": lambda w: squad_args(w, "--doc-stride", "500"),
    "doc_stride past the question room": lambda w: squad_args(w, "--doc-stride", "61"),
    "doc_stride -1": lambda w: squad_args(w, "--doc-stride", "-1"),
    "squad max_length 64": lambda w: squad_args(w, "--max-length", "64", "--doc-stride", "16"),
    "squad max_length 1000": lambda w: squad_args(w, "--max-length", "1000"),
    "n_best 0": lambda w: squad_args(w, "--n-best", "0"),
    "max_answer_length 0": lambda w: squad_args(w, "--max-answer-length", "0"),
    "null_threshold nan": lambda w: squad_args(w, "--null-threshold", "nan"),
    "squad epochs -1": lambda w: squad_args(w, "--epochs", "-1", "--max-steps", "0"),
    "squad batch_size 0": lambda w: squad_args(w, "--batch-size", "0"),
    "sst2 variant on squad": lambda w: squad_args(w, "--variant", "fp32"),
    # ---- model references ----------------------------------------------------------------------------------
    "model path missing": lambda w: sst2_args(w, "--model", "./no-such-model"),
    "model folder without config": lambda w: sst2_args(w, "--model", str(w["root"] / "model-noconfig")),
    "model config not JSON": lambda w: sst2_args(w, "--model", str(w["root"] / "model-badconfig")),
    "model is a file": lambda w: sst2_args(w, "--model", str(w["root"] / "a_file")),
    "random size unknown": lambda w: sst2_args(w, "--model", "random:huge"),
    "hub id offline": lambda w: sst2_args(w, "--model", "no-such-org/no-such-model"),
    # ---- SST-2 data ----------------------------------------------------------------------------------------
    "data_dir missing": lambda w: sst2_args(w, "--data-dir", str(w["root"] / "nowhere")),
    "data_dir is a file": lambda w: sst2_args(w, "--data-dir", str(w["root"] / "a_file")),
    **{f"sst2 {k}": (lambda k: lambda w: sst2_args(w, "--data-dir", w["sst2_bad"][k]))(k)
       for k in ("bad header", "label 2", "three columns", "no rows", "empty file", "non-UTF-8 train",
                 "non-UTF-8 dev", "non-UTF-8 header", "label words", "missing dev.tsv", "train.tsv is a folder")},
    # ---- SQuAD data ----------------------------------------------------------------------------------------
    **{f"squad dev {k}": (lambda k: lambda w: squad_args(w, "--data-dir", w["squad_bad"][k]))(k)
       for k in ("not JSON", "non-UTF-8", "top-level list", "no data key", "paragraphs not a list",
                 "context a number", "question without id", "duplicate question id", "answer_start off",
                 "is_impossible with answers", "answer_start a string", "no questions", "empty file")},
    "squad train duplicate id": lambda w: squad_args(w, "--data-dir", str(w["squad_bad_train"])),
    "squad data_dir missing": lambda w: squad_args(w, "--data-dir", str(w["root"] / "nowhere")),
    # ---- score files ---------------------------------------------------------------------------------------
    "score data missing": lambda w: ["score", "--data", str(w["root"] / "none.json"), "--preds",
                                     str(w["root"] / "preds.json")],
    "score preds missing": lambda w: ["score", "--data", w["dev_json"], "--preds", str(w["root"] / "none.json")],
    "score preds a list": lambda w: ["score", "--data", w["dev_json"], "--preds", str(w["root"] / "preds_list.json")],
    "score preds ints": lambda w: ["score", "--data", w["dev_json"], "--preds", str(w["root"] / "preds_int.json")],
    "score preds not JSON": lambda w: ["score", "--data", w["dev_json"], "--preds", str(w["root"] / "preds_bad.json")],
    "score preds non-UTF-8": lambda w: ["score", "--data", w["dev_json"], "--preds", str(w["root"] / "preds_enc.json")],
    "score preds is a folder": lambda w: ["score", "--data", w["dev_json"], "--preds", str(w["root"])],
    "score na_probs strings": lambda w: ["score", "--data", w["dev_json"], "--preds", str(w["root"] / "preds.json"),
                                         "--na-probs", str(w["root"] / "na_str.json")],
    "score na_probs booleans": lambda w: ["score", "--data", w["dev_json"], "--preds", str(w["root"] / "preds.json"),
                                          "--na-probs", str(w["root"] / "na_bool.json")],
    "score data duplicate ids": lambda w: ["score", "--data", str(w["root"] / "dup_dev.json"), "--preds",
                                           str(w["root"] / "preds.json")],
    "score data non-UTF-8": lambda w: ["score", "--data", os.path.join(w["squad_bad"]["non-UTF-8"], "dev-v2.0.json"),
                                       "--preds", str(w["root"] / "preds.json")],
    "score without preds": lambda w: ["score", "--data", w["dev_json"]],
    # ---- predict inputs and payloads (the same row checks guard the served model) ------------------------
    "predict no input": lambda w: predict_args(w),
    "predict question without context": lambda w: predict_args(w, "--question", "why?"),
    "predict file and text": lambda w: predict_args(w, "--file", str(w["root"] / "no_text.jsonl"), "--text", "x"),
    "predict qa input on sst2 model": lambda w: predict_args(w, "--question", "why?", "--context", "because"),
    "predict file missing": lambda w: predict_args(w, "--file", str(w["root"] / "none.jsonl")),
    "predict file non-UTF-8": lambda w: predict_args(w, "--file", str(w["root"] / "enc.jsonl")),
    "predict file is a folder": lambda w: predict_args(w, "--file", str(w["root"])),
    "payload without text": lambda w: predict_args(w, "--file", str(w["root"] / "no_text.jsonl")),
    "payload null text": lambda w: predict_args(w, "--file", str(w["root"] / "null_text.jsonl")),
    "payload number text": lambda w: predict_args(w, "--file", str(w["root"] / "number_text.jsonl")),
    "payload list text": lambda w: predict_args(w, "--file", str(w["root"] / "list_text.jsonl")),
    "payload dict text": lambda w: predict_args(w, "--file", str(w["root"] / "dict_text.jsonl")),
    "payload bad JSON line": lambda w: predict_args(w, "--file", str(w["root"] / "bad_line.jsonl")),
    "payload array line": lambda w: predict_args(w, "--file", str(w["root"] / "array_line.jsonl")),
    "payload no rows": lambda w: predict_args(w, "--file", str(w["root"] / "blank.jsonl")),
    "payload QA rows to sst2 model": lambda w: predict_args(w, "--file", str(w["root"] / "qa_rows.jsonl")),
    "predict out is a folder": lambda w: predict_args(w, "--text", "good", "--out", str(w["root"])),
    "predict out in a missing folder": lambda w: predict_args(w, "--text", "good", "--out",
                                                              str(w["root"] / "nowhere" / "o.jsonl")),
    "predict model folder missing": lambda w: ["predict", "--model", "./no-such-export", "--text", "x"],
    "predict model not registered": lambda w: ["predict", "--model", "models:/hpml-sst2-zz@champion", "--text", "x"],
    "predict model bad version": lambda w: ["predict", "--model", "models:/hpml-sst2-fp32/99", "--text", "x"],
    # ---- report, models, make-data, probe ------------------------------------------------------------------
    "report out is a file": lambda w: ["report", "--out", str(w["root"] / "a_file")],
    "report out under a file": lambda w: ["report", "--out", str(w["root"] / "a_file" / "r")],
    "report bad format": lambda w: ["report", "--out", str(w["root"] / "r"), "--formats", "pdf"],
    "report bad purpose": lambda w: ["report", "--out", str(w["root"] / "r"), "--purpose", "prod"],
    "report unknown experiment": lambda w: ["report", "--out", str(w["root"] / "r"), "--experiments", "nope"],
    "report empty store": lambda w: ["report", "--out", str(w["root"] / "r")],
    "report unreachable server": lambda w: ["report", "--out", str(w["root"] / "r"), "--tracking-uri",
                                            "http://127.0.0.1:9"],
    "models bad task": lambda w: ["models", "--task", "mnli9"],
    "make-data unknown task": lambda w: ["make-data", "cola", "--out", str(w["root"] / "d")],
    "make-data out is a file": lambda w: ["make-data", "sst2", "--out", str(w["root"] / "a_file")],
    "make-data negative rows": lambda w: ["make-data", "sst2", "--out", str(w["root"] / "d"), "--train", "-5"],
    "vram-probe without a GPU": lambda w: ["vram-probe", "--variant", "a3", "--model", "random:tiny"],
    "unknown command": lambda w: ["trian-sst2"],
}


def store_counts(uri):
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps) if exps else []
    return len(runs), len(client.search_model_versions())


def test_corpus_has_at_least_100_cases():
    assert len(CASES) >= 100, len(CASES)


CPU_ONLY = {"cuda-only variant on cpu", "vram-probe without a GPU"}  # inputs that are fine on a CUDA machine


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(
    n in CPU_ONLY and torch.cuda.is_available(), reason="malformed only without a GPU")) for n in CASES])
def test_malformed_input_is_one_line(name, world, monkeypatch):
    monkeypatch.chdir(world["root"])  # anything a case wrongly wrote lands here, not in the repository
    args = CASES[name](world)
    result = CliRunner().invoke(cli.main, args, env={"MLFLOW_TRACKING_URI": world["uri"]})
    err = result.stderr.strip()
    assert result.exit_code not in (0, None), f"{name}: exit 0\n{result.output}"
    assert isinstance(result.exception, SystemExit), f"{name}: {result.exc_info and result.exc_info[1]!r}"
    assert "Traceback" not in result.output, name
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpml: error: "), f"{name}: {err}"
    assert store_counts(world["uri"]) == (0, 0), f"{name} left a run or a model version"
