"""Exported models: the folder format, loading (full or PEFT adapter), batch prediction, and the hpml pyfunc."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from hpml.errors import HpmlError

META_FILE = "hpml_model.json"
PYFUNC_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfunc_model.py")
MODEL_DIR = "model"  # HF checkpoint (full fine-tune) or PEFT adapter folder, with the tokenizer beside it
BASE_DIR = "base"  # only for bases no one else can rebuild (random:<size>): the exact weights the adapter fits
INPUT_COLUMNS = {"squad": ["question", "context"], "sst2": ["text"]}
OUTPUT_COLUMNS = {"squad": ["answer", "score", "null_score"], "sst2": ["label", "probability"]}


# ---- writing --------------------------------------------------------------------------------------------
def write_export(out_dir: str, model, tokenizer, *, task: str, variant, base_ref: str, base_is_local_copy: bool,
                 settings: dict) -> str:
    """Save weights as safetensors (no pickled weights) plus a small JSON describing how to load them."""
    os.makedirs(out_dir, exist_ok=True)
    is_adapter = variant.trainable.mode == "lora"
    model.save_pretrained(os.path.join(out_dir, MODEL_DIR))
    tokenizer.save_pretrained(os.path.join(out_dir, MODEL_DIR))
    if is_adapter and base_is_local_copy:
        import shutil

        shutil.copytree(base_ref, os.path.join(out_dir, BASE_DIR), dirs_exist_ok=True)
    meta = {
        "task": task,
        "variant": variant.id,
        "kind": "adapter" if is_adapter else "full",
        # Where the adapter's base lives: "base" (inside this folder), a hub ID, or a local path.
        "base_model": BASE_DIR if (is_adapter and base_is_local_copy) else base_ref,
        "base_revision": _revision(model, base_ref),
        "quantization": variant.precision.quantization,
        "compute_dtype": variant.precision.dtype,
        "attention": variant.attention.impl,
        **settings,
    }
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def _revision(model, ref: str) -> Optional[str]:
    """The hub commit the base was loaded from (transformers records it on the config), when known."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    commit = getattr(getattr(base, "config", None), "_commit_hash", None)
    if commit:
        return commit
    cfg = os.path.join(ref, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return json.load(f).get("_commit_hash")
    return None


# ---- loading --------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: object
    tokenizer: object
    meta: dict
    device: str


def read_meta(export_dir: str) -> dict:
    path = os.path.join(export_dir, META_FILE)
    if not os.path.isfile(path):
        raise HpmlError(f"{export_dir} is not an hpml model folder ({META_FILE} missing)")
    with open(path) as f:
        return json.load(f)


def resolve_base(export_dir: str, meta: dict, base_model: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(where the adapter's base is, revision to ask the hub for): the override, the export's own `base/`
    copy, a local path, or a hub ID pinned to the revision it was trained on."""
    if base_model:
        return os.path.expanduser(base_model), None
    base = meta["base_model"]
    if base == BASE_DIR:
        return os.path.join(export_dir, BASE_DIR), None
    if os.path.isdir(base) or base.startswith((".", "/", "~")):
        return base, None
    return base, meta.get("base_revision")


def load_export(export_dir: str, base_model: Optional[str] = None, device: Optional[str] = None) -> Loaded:
    """Load an export for inference. `base_model` overrides where an adapter's base is found (offline use)."""
    from hpml import modeling

    meta = read_meta(export_dir)
    task = meta["task"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = os.path.join(export_dir, MODEL_DIR)
    cls = modeling.model_class(task)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if meta["kind"] == "full":
        model = cls.from_pretrained(model_dir, attn_implementation=meta.get("attention", "sdpa"), dtype=torch.float32)
        model.to(device)
    else:
        from peft import PeftModel

        base, revision = resolve_base(export_dir, meta, base_model)
        kwargs = dict(modeling.task_kwargs(task), attn_implementation=meta.get("attention", "sdpa"),
                      dtype=torch.float32)
        if revision:
            kwargs["revision"] = revision
        if meta.get("quantization") == "nf4":
            if device == "cuda":
                from transformers import BitsAndBytesConfig

                compute = torch.bfloat16 if meta.get("compute_dtype") == "bf16" else torch.float16
                kwargs.update(device_map={"": 0}, quantization_config=BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=modeling.NOT_QUANTIZED))
            else:
                print("note: no CUDA here, so this QLoRA adapter runs on the full-precision base "
                      "(predictions differ slightly from the 4-bit base it was trained on)", file=sys.stderr)
        is_path = os.path.isdir(base) or base.startswith((".", "/", "~"))
        if is_path and not os.path.isfile(os.path.join(base, "config.json")):
            raise HpmlError(f"the adapter's base model {base!r} cannot be found (no config.json there): pass "
                            "--base-model PATH (or set HPML_BASE_MODEL) pointing at a local copy of it")
        try:
            base_model_obj = cls.from_pretrained(base, **kwargs)
        except OSError:
            at = f" at revision {revision}" if revision else ""
            raise HpmlError(f"the adapter's base model {base!r}{at} cannot be found: pass --base-model PATH "
                            "(or set HPML_BASE_MODEL) pointing at a local copy of it") from None
        model = PeftModel.from_pretrained(base_model_obj, model_dir)
        if meta.get("quantization") != "nf4" or device != "cuda":
            model.to(device)
    model.eval()
    return Loaded(model, tokenizer, meta, device)


# ---- prediction -----------------------------------------------------------------------------------------
def check_input(task: str, frame: pd.DataFrame) -> None:
    """Every row has every input field of the task as a string; else one line naming the field and row."""
    missing = [c for c in INPUT_COLUMNS[task] if c not in frame.columns]
    if missing:
        raise HpmlError(f"input rows lack {', '.join(repr(c) for c in missing)}: a {task} model reads "
                        f"{', '.join(repr(c) for c in INPUT_COLUMNS[task])} in every row")
    for col in INPUT_COLUMNS[task]:
        for i, value in enumerate(frame[col]):
            if not isinstance(value, str):
                if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
                    raise HpmlError(f"input row {i + 1}: {col!r} is missing (null): every row needs it")
                raise HpmlError(f"input row {i + 1}: {col!r} must be a string, got {value!r}")
    if task == "squad":
        # An empty passage has no span to score (score -inf, which is not valid JSON in a response).
        for i, value in enumerate(frame["context"]):
            if not value.strip():
                raise HpmlError(f"input row {i + 1}: 'context' is empty: pass the passage to answer from")


@torch.inference_mode()
def _forward(loaded: Loaded, batch: dict):
    return loaded.model(**{k: v.to(loaded.device) for k, v in batch.items()})


def predict_sst2(loaded: Loaded, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Batches of `batch_size` sentences of similar length (sorted, answers put back in request order): a
    large request pads each batch to its own longest sentence, not to the request's, so 10,000 mixed-length
    rows cost about what their tokens cost."""
    max_length = loaded.meta.get("max_length", 128)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[dict] = [{}] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = loaded.tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt")
        probs = torch.softmax(_forward(loaded, dict(enc)).logits.float(), dim=-1).cpu().numpy()
        for i, p in zip(idx, probs):
            out[i] = {"label": int(p.argmax()), "probability": float(p.max())}
    return out


def predict_squad(loaded: Loaded, questions: list[str], contexts: list[str], batch_size: int = 32) -> list[dict]:
    """Windows, postprocessing and null rule exactly as in evaluation (same functions, same settings)."""
    from hpml.data import squad
    from hpml.data.batching import Collator
    from hpml.variants import Batching

    m = loaded.meta
    ids = [str(i) for i in range(len(questions))]

    def windows(q: list[str], c: list[str], i: list[str]):
        return squad.prepare_eval_features({"id": i, "question": q, "context": c}, loaded.tokenizer,
                                           m["max_length"], m["doc_stride"])

    try:
        enc = windows(list(questions), list(contexts), ids)
    except Exception as exc:  # the tokenizers library raises a bare Exception
        if "Truncation error" not in str(exc):
            raise
        for i, (q, c) in enumerate(zip(questions, contexts)):
            try:
                windows([q], [c], [ids[i]])
            except Exception:
                raise HpmlError(f"input row {i + 1}: the question leaves no room for the passage in this model's "
                                f"{m['max_length']}-token windows ({m['doc_stride']} tokens overlap): "
                                "shorten it") from None
        raise
    model_keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    features = [{k: enc[k][j] for k in model_keys + ["example_id", "offset_mapping"]}
                for j in range(len(enc["input_ids"]))]
    # Padding to the batch's longest window: attention masks make the logits those of evaluation's padding.
    collate = Collator(loaded.tokenizer.pad_token_id, m["max_length"], Batching(padding="longest"))
    starts, ends = [], []
    for i in range(0, len(features), batch_size):
        res = _forward(loaded, collate([{k: f[k] for k in model_keys} for f in features[i:i + batch_size]]))
        starts += list(res.start_logits.float().cpu().numpy())
        ends += list(res.end_logits.float().cpu().numpy())
    examples = [{"id": i, "context": c} for i, c in zip(ids, contexts)]
    result = squad.postprocess_predictions(examples, features, starts, ends, n_best=m["n_best"],
                                           max_answer_length=m["max_answer_length"],
                                           null_threshold=m["null_threshold"])
    by_id = {r["id"]: r for r in result.rows}
    return [{k: by_id[i][k] for k in OUTPUT_COLUMNS["squad"]} for i in ids]


def predict_frame(loaded: Loaded, frame: pd.DataFrame) -> pd.DataFrame:
    task = loaded.meta["task"]
    check_input(task, frame)
    if task == "sst2":
        rows = predict_sst2(loaded, list(frame["text"]))
    else:
        rows = predict_squad(loaded, list(frame["question"]), list(frame["context"]))
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS[task])


# ---- MLflow pyfunc ----------------------------------------------------------------------------------------
import mlflow.pyfunc  # noqa: E402  (serving.py is the one module besides tracking.py allowed to use mlflow)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # noqa: E402


class HpmlPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: the export folder travels as the `export` artifact; weights load in load_context."""

    def load_context(self, context):
        self.loaded = load_export(context.artifacts["export"], base_model=os.environ.get("HPML_BASE_MODEL"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return predict_frame(self.loaded, model_input)
        except HpmlError as exc:
            # The scoring server answers an MlflowException with its own HTTP status (this code: 400) and a
            # JSON message; any other exception becomes a generic "unexpected error" without our message.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def signature(task: str):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    out_types = {"answer": "string", "score": "double", "null_score": "double", "label": "long",
                 "probability": "double"}
    return ModelSignature(inputs=Schema([ColSpec("string", c) for c in INPUT_COLUMNS[task]]),
                          outputs=Schema([ColSpec(out_types[c], c) for c in OUTPUT_COLUMNS[task]]))


def pip_requirements() -> list[str]:
    import importlib.metadata as md

    pkgs = ["torch", "transformers", "peft", "accelerate", "datasets", "pandas", "mlflow"]
    return [f"{p}=={md.version(p)}" for p in pkgs]


# ---- loading by name: what `hpml predict` and the demo use -----------------------------------------------
def load_registered(model_uri: str, base_model: Optional[str] = None):
    """`models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/…` or an MLflow model folder → an MLflow pyfunc
    model. A name, version or alias the registry lacks ends in one HpmlError line."""
    from hpml import tracking

    if base_model:
        os.environ["HPML_BASE_MODEL"] = base_model  # read by HpmlPyfunc.load_context (same process)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not os.path.isdir(model_uri):
        tracking.connect()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        first = exc.message.strip().splitlines()[0] if exc.message.strip() else type(exc).__name__
        raise HpmlError(f"cannot load {model_uri!r} from {mlflow.get_registry_uri()}: {first} "
                        "(hpml models lists the registered names, versions and aliases)") from None


@dataclass
class Predictor:
    """A model ready to answer rows: a registered pyfunc or an export folder loaded directly."""

    task: str
    model: object  # mlflow PyFuncModel or Loaded

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        check_input(self.task, frame)  # before MLflow's schema check, whose message repeats the whole input
        if isinstance(self.model, Loaded):
            return predict_frame(self.model, frame)
        try:
            return self.model.predict(frame[INPUT_COLUMNS[self.task]])
        except MlflowException as exc:
            raise HpmlError(exc.message.strip().splitlines()[-1]) from None


def _quiet_loading() -> None:
    """For the command line: no weight-loading progress bars or library chatter around the one JSON answer
    (bitsandbytes warns on CPU that an optional 4-bit kernel package is absent; nothing here uses it)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def open_model(model: str, base_model: Optional[str] = None) -> Predictor:
    """An hpml export folder (hpml_model.json), an MLflow model folder or a models:/ / runs:/ URI."""
    _quiet_loading()
    if "://" not in model and model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise HpmlError(f"model folder {model!r} does not exist: pass models:/NAME@ALIAS, models:/NAME/VERSION "
                        "(hpml models lists them) or an existing export folder")
    model = os.path.expanduser(model) if "://" not in model else model
    if os.path.isfile(os.path.join(model, META_FILE)):
        loaded = load_export(model, base_model=base_model)
        return Predictor(loaded.meta["task"], loaded)
    pyfunc = load_registered(model, base_model)
    inner = pyfunc.unwrap_python_model()
    if not isinstance(inner, HpmlPyfunc):
        raise HpmlError(f"{model!r} is not an hpml model (its pyfunc is {type(inner).__name__})")
    return Predictor(inner.loaded.meta["task"], pyfunc)


def read_jsonl(path: str) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped); errors name the file and line."""
    from hpml.validate import read_text

    rows = []
    text = read_text(path, "the JSON lines input", "pass an existing file to --file")
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HpmlError(f"{path}:{n}: not JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise HpmlError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise HpmlError(f"{path} holds no input rows")
    return pd.DataFrame(rows)


def output_records(inputs: pd.DataFrame, outputs: pd.DataFrame) -> list[dict]:
    """Output rows as plain JSON values; an input `id` is carried over; -inf/NaN scores become null."""
    records = []
    for i, row in enumerate(outputs.to_dict(orient="records")):
        rec = {"id": inputs["id"].iloc[i], **row} if "id" in inputs.columns else dict(row)
        for k, v in rec.items():
            if isinstance(v, np.generic):  # numpy scalars are not JSON-serialisable
                v = v.item()
            if isinstance(v, float) and not np.isfinite(v):
                v = None
            rec[k] = v
        records.append(rec)
    return records
