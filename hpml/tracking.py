"""Every MLflow call hpml makes: run setup, tag/param/metric names, artifacts, registry and aliases."""
from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.error
import urllib.request
import warnings
from typing import Iterator, Optional

from hpml.errors import HpmlError, UsageError

# ---- names: the report and the tests read these, never string literals -------------------------------
# Tags
TAG_VARIANT = "variant"  # lower-case variant ID
TAG_TASK = "task"  # squad | sst2 | vram | report
TAG_PURPOSE = "purpose"  # demo | test | real
TAG_FINGERPRINT = "data_fingerprint"
TAG_GIT_COMMIT = "git_commit"
TAG_DEVICE = "device"  # e.g. "NVIDIA H100 80GB HBM3" or "cpu"
TAG_CONFIG_HASH = "config_hash"
TAG_PRECISION = "precision"  # what ran: fp32 | fp16 | bf16 (autocast) | nf4-fp16 | nf4-bf16 (4-bit base)
TAG_ATTENTION = "attention"  # the attention implementation the trained model really used (eager | sdpa)
TAG_COMPILED = "compiled"  # the torch.compile backend the Trainer really wrapped the model with, or "no"
TAG_VERSIONS_PREFIX = "version."  # version.torch, version.transformers, …

PURPOSES = ("demo", "test", "real")
TASKS = ("squad", "sst2", "mnli", "vram", "report")

# Metrics shared by both tasks (units in the names)
M_TRAIN_LOSS = "train_loss"
M_TRAIN_RUNTIME = "train_runtime_s"
M_TRAIN_SPS = "train_samples_per_s"  # SQuAD: features (windows) per second; Trainer's, warm-up included
M_TRAIN_STEADY_SPS = "train_steady_samples_per_s"  # after the first steps (compile, allocator warm-up)
M_EVAL_RUNTIME = "eval_runtime_s"
M_EVAL_SPS = "eval_samples_per_s"
M_EVAL_MS = "eval_ms_per_sample"  # latency per sample in the eval loop
M_TRAINABLE = "trainable_params"
M_TOTAL = "total_params"
M_TRAINABLE_PCT = "trainable_pct"
M_TRAINABLE_PCT_FULL = "trainable_pct_of_full_arch"
M_FULL_ARCH_PARAMS = "full_arch_params"
M_PEAK_TRAIN_ALLOC = "peak_train_vram_allocated_mib"
M_PEAK_TRAIN_RESERVED = "peak_train_vram_reserved_mib"
M_VRAM_AFTER_LOAD = "vram_after_load_mib"
M_PEAK_EVAL_VRAM = "peak_eval_vram_mib"

# SST-2
M_ACCURACY = "eval_accuracy"  # fraction 0–1

# SQuAD v2: the official evaluator's keys with an eval_ prefix, in percent 0–100
SQUAD_KEYS = ("exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact",
              "NoAns_f1", "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh")
M_EXACT = "eval_exact"
M_F1 = "eval_f1"

# VRAM probe
M_PROBE_ALLOC = "peak_vram_allocated_mib"
M_PROBE_RESERVED = "peak_vram_reserved_mib"
M_DEVICE_TOTAL = "device_total_mib"
M_MEM_PARAMS = "vram_params_mib"
M_MEM_GRADS = "vram_grads_mib"
M_MEM_OPTIMIZER = "vram_optimizer_mib"
M_MEM_ACTIVATIONS = "vram_activations_mib"

DEFAULT_EXPERIMENT = {"squad": "hpml-squad", "sst2": "hpml-sst2", "mnli": "hpml-mnli", "vram": "hpml-vram",
                      "report": "hpml-report"}
CHAMPION = "champion"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def registered_model_name(task: str, variant_id: str) -> str:
    return f"hpml-{task}-{variant_id.lower()}"


# ---- connection --------------------------------------------------------------------------------------


def tracking_uri(explicit: str = "") -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else the project's SQLite default."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect(explicit: str = "") -> str:
    """Point MLflow at the store; for a server, fail fast (5 s) instead of the client's ~4 min of retries."""
    import mlflow

    uri = tracking_uri(explicit)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                ok = resp.status == 200
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise HpmlError(f"tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}): start it "
                            "(mlflow server) or set MLFLOW_TRACKING_URI to a reachable server or sqlite:///mlflow.db")
        if not ok:
            raise HpmlError(f"tracking server {uri} answered /health with an error: check the server's log")
    mlflow.set_tracking_uri(uri)
    return uri


# ---- provenance tags ----------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "mlflow", "hpml"):
        try:
            out[TAG_VERSIONS_PREFIX + pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---- runs ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def run(task: str, run_name: str, experiment: str, tags: dict[str, str], inputs: dict[str, object],
        resolved: dict[str, object]) -> Iterator[str]:
    """One MLflow run: joins the run `mlflow run` created (MLFLOW_RUN_ID), else creates one in `experiment`.

    Params: the inputs as given under their plain names (mlflow run logs those itself, as typed) and the
    resolved configuration under `resolved.*` / `variant.*`, so every run has the same keys either way.
    Ends FINISHED only when the body returns; any exception ends it FAILED and propagates.
    """
    import mlflow

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        active = mlflow.start_run(run_id=run_id)
        exp = mlflow.get_experiment(active.info.experiment_id)
        if experiment and experiment not in (exp.name, DEFAULT_EXPERIMENT.get(task)):
            mlflow.end_run("FAILED")
            raise UsageError(f"experiment={experiment!r} cannot move a run that mlflow run created in "
                             f"{exp.name!r}: use mlflow run --experiment-name {experiment} instead")
    else:
        exp = mlflow.set_experiment(experiment or DEFAULT_EXPERIMENT[task])
        active = mlflow.start_run(run_name=run_name)
    try:
        mlflow.set_tags({"mlflow.runName": run_name, TAG_TASK: task, TAG_GIT_COMMIT: git_commit(),
                         TAG_DEVICE: device_name(), **library_versions(), **tags})
        already = mlflow.get_run(active.info.run_id).data.params
        log_params({k: v for k, v in inputs.items() if k not in already})
        log_params(resolved)
        yield active.info.run_id
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


TAG_ERROR = "error"  # one line: why a run ended FAILED or KILLED outside its own process (hpml.launch)


def fail_run(run_id: str, message: str, status: str = "FAILED") -> None:
    """End a run that its own process could not end (a data-parallel job whose worker died): tag the error,
    delete any registry version it made (a failed run registers nothing) and set the status."""
    from mlflow import MlflowClient

    connect()
    client = MlflowClient()
    client.set_tag(run_id, TAG_ERROR, message[:5000])
    for mv in client.search_model_versions(f"run_id='{run_id}'"):
        client.delete_model_version(mv.name, mv.version)
    client.set_terminated(run_id, status)


def log_params(params: dict[str, object]) -> None:
    import mlflow

    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})


def log_metrics(metrics: dict[str, float], step: Optional[int] = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_artifacts(local_dir: str, artifact_path: Optional[str] = None) -> None:
    import mlflow

    mlflow.log_artifacts(local_dir, artifact_path)


def log_dict(obj: object, name: str) -> None:
    import mlflow

    mlflow.log_dict(obj, name)


# ---- registry -----------------------------------------------------------------------------------------
def register_model(export_dir: str, name: str, model: dict, headline: str, metrics: dict[str, float],
                   tags: dict[str, str]) -> tuple[int, bool]:
    """Log the export as a pyfunc, register a new version of `name`, move `champion` by champion_rule.

    `model`: python_model (a models-from-code file), signature, pip_requirements and code_paths, from the
    caller (serving.model_spec): this module imports no other hpml module. `headline`: the metric the alias
    compares. Returns (version, became_champion). A failure after the version exists deletes it: a failed run
    leaves no registry entry behind.
    """
    import mlflow
    from mlflow import MlflowClient

    # Models from code: the pyfunc is a file, not a pickled object (and weights are safetensors). No input
    # example: MLflow would load and run the model once more just to validate it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*")
        info = mlflow.pyfunc.log_model(name="model", artifacts={"export": export_dir}, **model)
    client = MlflowClient()
    version = None
    try:
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
        version = int(mv.version)
        for key, value in metrics.items():
            if key in (headline, M_EXACT, M_ACCURACY, M_F1):
                client.set_model_version_tag(name, str(version), key, repr(float(value)))
        client.set_model_version_tag(name, str(version), "run_id", mlflow.active_run().info.run_id)
        became = champion_rule(current_champion(client, name), metrics[headline], tags, headline)
        if became:
            client.set_registered_model_alias(name, CHAMPION, str(version))
        return version, became
    except BaseException:
        if version is not None:
            client.delete_model_version(name, str(version))
        raise


def current_champion(client, name: str):
    """The champion version, or None when the alias does not exist yet. Any other registry error propagates:
    reading it as "no champion" would hand the alias to a worse version."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST") and \
                "alias" in exc.message.lower() and "not found" in exc.message.lower():
            return None
        raise


def champion_rule(champ, value: float, tags: dict[str, str], headline: str) -> bool:
    """Does a new version (headline `value`, `tags`) take the alias from `champ` (None: there is none)?

    1. No champion: yes.  2. `real` outranks `demo`/`test` both ways: a real version always displaces a
    demo/test champion and is never displaced by one.  3. Same rank, other data fingerprint: yes, the newest
    data wins (a champion is the best model of the data it is served on, and new data means a new contest).
    4. Same rank and fingerprint: only if strictly better on the headline metric (a champion without the
    metric tag is displaced).
    """
    if champ is None:
        return True
    rank = {"real": 1}
    new_rank, champ_rank = rank.get(tags.get(TAG_PURPOSE, ""), 0), rank.get(champ.tags.get(TAG_PURPOSE, ""), 0)
    if new_rank != champ_rank:
        return new_rank > champ_rank
    if champ.tags.get(TAG_FINGERPRINT) != tags.get(TAG_FINGERPRINT):
        return True
    champ_value = champ.tags.get(headline)
    return champ_value is None or value > float(champ_value)


# ---- report queries -----------------------------------------------------------------------------------
REPORT_RUN_NAME = "report"


def search_runs(experiment_names: Optional[list[str]] = None):
    """Every active run of the named experiments (None or empty: of all active experiments) as
    mlflow.search_runs' pandas frame; an empty frame when there are none. An unknown name is an error: a
    typo would otherwise print a report of empty tables."""
    import mlflow
    import pandas as pd

    if experiment_names:
        missing = [n for n in experiment_names if mlflow.get_experiment_by_name(n) is None]
        if missing:
            known = ", ".join(sorted(e.name for e in mlflow.search_experiments())) or "none"
            raise UsageError(f"experiment(s) {', '.join(missing)} not found at {mlflow.get_tracking_uri()} "
                             f"(it has: {known}); leave experiments empty to search every experiment")
        df = mlflow.search_runs(experiment_names=list(experiment_names), output_format="pandas")
    else:
        # All experiments: runs started by `mlflow run` land wherever --experiment-name put them.
        df = mlflow.search_runs(search_all_experiments=True, output_format="pandas")
    return df if isinstance(df, pd.DataFrame) else pd.DataFrame()


def log_files(paths: list[str], artifact_path: Optional[str] = None) -> None:
    """Log exactly these files (not their whole folder, which may hold stale outputs of an earlier call)."""
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path)


# ---- registry listing (`hpml models`) --------------------------------------------------------------------
def list_registered(headlines: dict[str, str], prefix: str = "hpml-") -> list[dict[str, object]]:
    """Every version of every registered model named `prefix*`: name, version, aliases, task, variant,
    purpose, data fingerprint, headline metric (`headlines[task]`; value None when the tag is absent), run id."""
    from mlflow import MlflowClient

    client = MlflowClient()
    models, token = [], None
    while True:  # the registry pages its answers (100 models per page)
        page = client.search_registered_models(filter_string=f"name LIKE '{prefix}%'", page_token=token)
        models += list(page)
        token = page.token
        if not token:
            break
    rows = []
    for rm in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        task = rm.name[len(prefix):].split("-", 1)[0]
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            metric = headlines.get(task, "")
            value = mv.tags.get(metric)
            rows.append({"name": rm.name, "version": int(mv.version),
                         "aliases": sorted(aliases.get(str(mv.version), [])), "task": task,
                         "variant": mv.tags.get(TAG_VARIANT, ""), "purpose": mv.tags.get(TAG_PURPOSE, ""),
                         "data_fingerprint": mv.tags.get(TAG_FINGERPRINT, ""), "metric": metric,
                         "value": float(value) if value not in (None, "") else None, "run_id": mv.run_id})
    return sorted(rows, key=lambda r: (r["name"], r["version"]))
