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
        "base_revision": _revision(base_ref),
        "quantization": variant.precision.quantization,
        "compute_dtype": variant.precision.dtype,
        "attention": variant.attention.impl,
        **settings,
    }
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def _revision(ref: str) -> Optional[str]:
    """The commit of a hub snapshot folder or the `_commit_hash` a config records, when known."""
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

        base = base_model or meta["base_model"]
        if base == BASE_DIR:
            base = os.path.join(export_dir, BASE_DIR)
        kwargs = dict(modeling.task_kwargs(task), attn_implementation=meta.get("attention", "sdpa"), dtype=torch.float32)
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
        try:
            base_model_obj = cls.from_pretrained(base, **kwargs)
        except OSError:
            raise HpmlError(f"the adapter's base model {base!r} cannot be found: pass --base-model PATH "
                            "(or set HPML_BASE_MODEL) pointing at a local copy of it") from None
        model = PeftModel.from_pretrained(base_model_obj, model_dir)
        if meta.get("quantization") != "nf4" or device != "cuda":
            model.to(device)
    model.eval()
    return Loaded(model, tokenizer, meta, device)


# ---- prediction -----------------------------------------------------------------------------------------
def check_columns(task: str, frame) -> None:
    missing = [c for c in INPUT_COLUMNS[task] if c not in frame.columns]
    if missing:
        raise HpmlError(f"input rows need column(s) {', '.join(missing)} for task {task} "
                        f"(expected: {', '.join(INPUT_COLUMNS[task])})")


@torch.inference_mode()
def _logits(loaded: Loaded, batches):
    for batch in batches:
        batch = {k: v.to(loaded.device) for k, v in batch.items()}
        yield loaded.model(**batch)


def predict_sst2(loaded: Loaded, texts: list[str], batch_size: int = 32) -> list[dict]:
    out = []
    max_length = loaded.meta.get("max_length", 128)
    for i in range(0, len(texts), batch_size):
        enc = loaded.tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt")
        (res,) = list(_logits(loaded, [dict(enc)]))
        probs = torch.softmax(res.logits.float(), dim=-1).cpu().numpy()
        out += [{"label": int(p.argmax()), "probability": float(p.max())} for p in probs]
    return out


def predict_squad(loaded: Loaded, questions: list[str], contexts: list[str], batch_size: int = 32) -> list[dict]:
    """Windows, postprocessing and null rule exactly as in evaluation (same functions, same settings)."""
    import datasets

    from hpml.data import squad
    from hpml.data.batching import Collator
    from hpml.variants import Batching

    m = loaded.meta
    examples = datasets.Dataset.from_dict({
        "id": [str(i) for i in range(len(questions))], "question": list(questions), "context": list(contexts),
        "answers": [{"text": [], "answer_start": []} for _ in questions]})
    features = examples.map(
        lambda b: squad.prepare_eval_features(b, loaded.tokenizer, m["max_length"], m["doc_stride"]),
        batched=True, remove_columns=examples.column_names)
    collate = Collator(loaded.tokenizer.pad_token_id, m["max_length"], Batching(padding="longest"))
    starts, ends = [], []
    for i in range(0, len(features), batch_size):
        rows = [features[j] for j in range(i, min(i + batch_size, len(features)))]
        (res,) = list(_logits(loaded, [collate(rows)]))
        for s, e in zip(res.start_logits.float().cpu().numpy(), res.end_logits.float().cpu().numpy()):
            starts.append(s)
            ends.append(e)
    width = max(len(s) for s in starts)
    pad = lambda arrs: np.stack([np.pad(a, (0, width - len(a)), constant_values=-1e4) for a in arrs])
    result = squad.postprocess_predictions(examples, features, pad(starts), pad(ends), n_best=m["n_best"],
                                           max_answer_length=m["max_answer_length"],
                                           null_threshold=m["null_threshold"])
    by_id = {r["id"]: r for r in result.rows}
    return [{k: by_id[str(i)][k] for k in OUTPUT_COLUMNS["squad"]} for i in range(len(questions))]


def predict_frame(loaded: Loaded, frame: pd.DataFrame) -> pd.DataFrame:
    task = loaded.meta["task"]
    check_columns(task, frame)
    if task == "sst2":
        rows = predict_sst2(loaded, [str(t) for t in frame["text"]])
    else:
        rows = predict_squad(loaded, [str(q) for q in frame["question"]], [str(c) for c in frame["context"]])
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS[task])


# ---- MLflow pyfunc ----------------------------------------------------------------------------------------
import mlflow.pyfunc  # noqa: E402  (serving.py is the one module besides tracking.py allowed to use mlflow)


class HpmlPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: the export folder travels as the `export` artifact; weights load in load_context."""

    def load_context(self, context):
        self.loaded = load_export(context.artifacts["export"], base_model=os.environ.get("HPML_BASE_MODEL"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return predict_frame(self.loaded, model_input)


def load_registered(model_uri: str):
    """`models:/NAME@alias`, `models:/NAME/VERSION` or `runs:/…` → an MLflow pyfunc model."""
    return mlflow.pyfunc.load_model(model_uri)


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
