"""The registered MLflow model: the hpml pyfunc around an export folder (export.py), its signature,
requirements and the code that travels with it; loading registered models by name for `hpml predict`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from hpml.errors import HpmlError
from hpml.export import (BASE_DIR, META_FILE, MODEL_DIR, Loaded, check_input, load_export, predict_frame,  # noqa: F401
                         predict_sst2)

__all__ = ["BASE_DIR", "META_FILE", "MODEL_DIR", "HpmlPyfunc", "load_export", "open_model"]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))  # the hpml package: travels with every model
PYFUNC_FILE = os.path.join(PACKAGE_DIR, "pyfunc_model.py")
# What the pyfunc imports at load and predict time, besides hpml itself (which travels as code).
RUNTIME_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "peft", "accelerate", "numpy", "pandas",
                    "mlflow")


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


def signature(spec):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", c) for c in spec.input_columns]),
                          outputs=Schema([ColSpec(t, c) for c, t in spec.output_columns]))


def pip_requirements(quantized: bool = False) -> list[str]:
    """Pinned to the versions that trained the model; bitsandbytes where a 4-bit base needs it. hpml itself is
    no requirement: it is not published on PyPI (a name lookup could install someone else's package), so the
    package travels with the model as code (code_paths)."""
    import importlib.metadata as md

    pkgs = list(RUNTIME_PACKAGES) + (["bitsandbytes"] if quantized else [])
    return [f"{p}=={md.version(p)}" for p in pkgs]


def model_spec(spec, quantized: bool) -> dict:
    """Everything tracking.register_model needs to log an hpml pyfunc for `spec` (tracking imports no hpml)."""
    return {"python_model": PYFUNC_FILE, "signature": signature(spec), "pip_requirements": pip_requirements(quantized),
            "code_paths": [PACKAGE_DIR]}


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

    spec: object  # the task's TaskSpec
    model: object  # mlflow PyFuncModel or Loaded

    @property
    def task(self) -> str:
        return self.spec.name

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        check_input(self.spec, frame)  # before MLflow's schema check, whose message repeats the whole input
        if isinstance(self.model, Loaded):
            return predict_frame(self.model, frame)
        try:
            return self.model.predict(frame[list(self.spec.input_columns)])
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
        return Predictor(loaded.spec, loaded)
    pyfunc = load_registered(model, base_model)
    inner = pyfunc.unwrap_python_model()
    if not isinstance(inner, HpmlPyfunc):
        raise HpmlError(f"{model!r} is not an hpml model (its pyfunc is {type(inner).__name__})")
    return Predictor(inner.loaded.spec, pyfunc)


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
