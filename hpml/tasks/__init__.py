"""Task specs: everything that differs between tasks (data, head, metrics, serving) behind one frozen record.

The training path, the exporter, the registry and the CLI ask the spec; none of them branches on a task
name. A new task is one module exporting SPEC, registered in TASKS below, plus catalog variants, a
declared parameter list (config.py) and an MLproject entry point.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from hpml.config import Param
from hpml.errors import UsageError


@dataclass
class Prepared:
    """What a task's prepare() hands the training path."""

    train: Any  # tokenized training features (datasets.Dataset)
    eval_examples: Any  # raw eval examples
    eval_features: Any  # tokenized eval features, bookkeeping columns included
    fingerprint: str  # hash of the data source (files or hub dataset + revision) and the sample limits


@dataclass
class Evaluation:
    """A pure evaluate()'s answer: logged metrics and JSON artifacts {file name: object}."""

    metrics: dict[str, float]
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # lower-case; tag `task`, registered names hpml-<name>-<variant>, CLI train-<name>
    title: str  # for people: "SQuAD v2"
    auto_class: str  # the transformers Auto class of the model with its head
    num_labels: Optional[int]  # classification heads only
    head_module: str  # the head's module name: always trained, kept out of 4-bit
    peft_task_type: str  # peft.TaskType member
    params: tuple[Param, ...]  # the declared options of `hpml train-<name>` / MLproject train_<name>
    headline: str  # the metric the champion alias compares (higher is better)
    shown: tuple[str, ...]  # metrics the CLI prints after a run
    input_columns: tuple[str, ...]  # serving request fields, in order
    output_columns: tuple[tuple[str, str], ...]  # serving response (name, MLflow column type)
    prepare: Callable  # (cfg, tokenizer, cache_dir) -> Prepared
    eval_inputs: Callable  # (Prepared) -> the eval features the model sees (bookkeeping dropped)
    evaluate: Callable  # pure: (model outputs, Prepared, cfg) -> Evaluation
    epoch_metrics: Optional[Callable]  # Trainer compute_metrics per epoch, or None (scored once at the end)
    export_settings: Callable  # (cfg) -> dict saved in the export; predict() reads it back
    predict: Callable  # (model, tokenizer, meta, device, frame) -> list of response rows
    check_rows: Callable  # (frame) -> None or HpmlError naming the bad row
    make_data: Callable  # (out_dir, n_train, n_dev, seed) -> written paths (GLUE/official format)
    make_data_sizes: tuple[int, int]  # default (train, dev) sizes of `hpml make-data`
    fingerprint: Callable  # (cfg) -> the data_fingerprint tag, as prepare() computes it (no tokenization)
    hub_repo: str  # the hub dataset read when data_dir is empty
    hub_config: Optional[str]  # its config (GLUE: sst2, mnli), None if it has none
    files: dict  # {"train": file name, "validation": file name} in a data_dir
    default_experiment: str = ""

    @property
    def entry_point(self) -> str:
        return f"train_{self.name}"

    @property
    def command(self) -> str:
        return f"train-{self.name}"

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def model_kwargs(self) -> dict:
        return {"num_labels": self.num_labels} if self.num_labels else {}


# ---- data fingerprints (shared by every task) -----------------------------------------------------------
def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, read once per process while its size and mtime stay the same (a start asks
    for each data file's digest several times: the run's fingerprint, each split's feature key, the
    datasets logged to MLflow)."""
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hub_revision(repo: str) -> str:
    """The commit of a hub dataset the run reads: asked from the hub, else read from the local hub cache
    (offline runs load from there). 'unresolved' only where neither knows, and then loading fails anyway."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().dataset_info(repo, timeout=10).sha
        except Exception:  # no network or no such dataset: fall back to the cache's record of "main"
            pass
    try:
        ref = os.path.join(constants.HF_HUB_CACHE, f"datasets--{repo.replace('/', '--')}", "refs", "main")
        with open(ref) as f:
            return f.read().strip()
    except OSError:
        return "unresolved"


def data_fingerprint(data_dir: str, files: list[str], hub: str, revision: Optional[str], limits: dict) -> str:
    """Local files: their contents' hashes. Hub: dataset (and config) and the revision (commit) it was read at."""
    if data_dir:
        source: dict = {"files": {os.path.basename(p): file_digest(p) for p in files}}
    else:
        source = {"hub": hub, "revision": revision}
    return fingerprint({**source, **limits})


def load_revision(data_dir: str, hub_repo: str) -> Optional[str]:
    """The commit to load a hub dataset at (None for local files, or when it cannot be resolved)."""
    if data_dir:
        return None
    rev = hub_revision(hub_repo)
    return None if rev == "unresolved" else rev


# ---- the registry of tasks ------------------------------------------------------------------------------
def _load_all() -> dict[str, TaskSpec]:
    from hpml.tasks import mnli, squad, sst2

    return {s.name: s for s in (squad.SPEC, sst2.SPEC, mnli.SPEC)}


_TASKS: dict[str, TaskSpec] = {}


def all_tasks() -> dict[str, TaskSpec]:
    if not _TASKS:
        _TASKS.update(_load_all())
    return _TASKS


def get_task(name: str) -> TaskSpec:
    spec = all_tasks().get(name)
    if spec is None:
        raise UsageError(f"unknown task {name!r}; valid: {', '.join(all_tasks())}")
    return spec


def task_names() -> tuple[str, ...]:
    """Training tasks, without importing their modules (variants.py and tracking.py need only the names)."""
    return ("squad", "sst2", "mnli")
