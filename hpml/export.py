"""Exported models without MLflow: the folder format, loading (full or PEFT adapter) and batch prediction.

Nothing here imports mlflow: an export folder can be written, loaded and asked for predictions by plain
Python. serving.py wraps it as the registered MLflow pyfunc.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from hpml.errors import HpmlError

META_FILE = "hpml_model.json"
MODEL_DIR = "model"  # HF checkpoint (full fine-tune) or PEFT adapter folder, with the tokenizer beside it
BASE_DIR = "base"  # only for bases no one else can rebuild (random:<size>): the exact weights the adapter fits


# ---- writing --------------------------------------------------------------------------------------------
def write_export(out_dir: str, model, tokenizer, *, spec, variant, base_ref: str, base_is_local_copy: bool,
                 settings: dict) -> str:
    """Save weights as safetensors (no pickled weights) plus a small JSON describing how to load them."""
    os.makedirs(out_dir, exist_ok=True)
    is_adapter = variant.trainable.mode == "lora"
    model.save_pretrained(os.path.join(out_dir, MODEL_DIR))
    tokenizer.save_pretrained(os.path.join(out_dir, MODEL_DIR))
    if is_adapter and base_is_local_copy:
        shutil.copytree(base_ref, os.path.join(out_dir, BASE_DIR), dirs_exist_ok=True)
    meta = {
        "task": spec.name,
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

    @property
    def spec(self):
        from hpml.tasks import get_task

        return get_task(self.meta["task"])

    @torch.inference_mode()
    def forward(self, batch: dict):
        return self.model(**{k: v.to(self.device) for k, v in batch.items()})


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


def quantization_config(compute_dtype: str):
    from transformers import BitsAndBytesConfig

    from hpml.modeling import NOT_QUANTIZED

    compute = torch.bfloat16 if compute_dtype == "bf16" else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=NOT_QUANTIZED)


def load_export(export_dir: str, base_model: Optional[str] = None, device: Optional[str] = None) -> Loaded:
    """Load an export for inference. `base_model` overrides where an adapter's base is found (offline use)."""
    from transformers import AutoTokenizer

    from hpml.tasks import get_task

    meta = read_meta(export_dir)
    spec = get_task(meta["task"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = os.path.join(export_dir, MODEL_DIR)
    cls = spec.model_class()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if meta["kind"] == "full":
        model = cls.from_pretrained(model_dir, attn_implementation=meta.get("attention", "sdpa"), dtype=torch.float32)
        model.to(device)
    else:
        from peft import PeftModel

        base, revision = resolve_base(export_dir, meta, base_model)
        kwargs = dict(spec.model_kwargs(), attn_implementation=meta.get("attention", "sdpa"), dtype=torch.float32)
        if revision:
            kwargs["revision"] = revision
        if meta.get("quantization") == "nf4":
            if device == "cuda":
                kwargs.update(device_map={"": 0}, quantization_config=quantization_config(meta.get("compute_dtype")))
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
def check_input(spec, frame: pd.DataFrame) -> None:
    """Every row has every input field of the task as a string; else one line naming the field and row."""
    columns = list(spec.input_columns)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise HpmlError(f"input rows lack {', '.join(repr(c) for c in missing)}: a {spec.name} model reads "
                        f"{', '.join(repr(c) for c in columns)} in every row")
    for col in columns:
        for i, value in enumerate(frame[col]):
            if not isinstance(value, str):
                if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
                    raise HpmlError(f"input row {i + 1}: {col!r} is missing (null): every row needs it")
                raise HpmlError(f"input row {i + 1}: {col!r} must be a string, got {value!r}")
    spec.check_rows(frame)


def output_names(spec) -> list[str]:
    return [name for name, _ in spec.output_columns]


def predict_frame(loaded: Loaded, frame: pd.DataFrame) -> pd.DataFrame:
    spec = loaded.spec
    check_input(spec, frame)
    return pd.DataFrame(spec.predict(loaded, frame), columns=output_names(spec))


def predict_sst2(loaded: Loaded, texts: list[str], batch_size: int = 32) -> list[dict]:
    """SST-2 rows for a list of sentences (benchmarks and tests call this directly)."""
    from hpml.tasks import get_task

    return get_task("sst2").predict(loaded, pd.DataFrame({"text": list(texts)}), batch_size)
