"""Checkpoints and `hpml resume`: where a run's checkpoints live, what they hold, which run to continue.

A run writes HF Trainer checkpoints to `<output_dir>/<run ID>/checkpoint-<step>` (output_dir defaults to
./hpml-checkpoints): weights (or the adapter), optimizer, scheduler, RNG states and the data position, so
Trainer resumes exactly. hpml adds `hpml_loss.json` (the summed training loss so far) so that a resumed
run's `train_loss` averages over all its steps, not only those after the resume. A FINISHED run deletes its
folder: the registry holds the model it needs. A KILLED or FAILED run keeps it for `hpml resume`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

from hpml.config import TrainConfig
from hpml.errors import HpmlError, UsageError

DEFAULT_ROOT = "hpml-checkpoints"
# Where and how often a run saves does not change what it computes: kept out of the config hash.
NOT_CONFIG = ("resolved.output_dir", "resolved.save_steps", "resolved.save_total_limit")
LOSS_FILE = "hpml_loss.json"


def root_dir(cfg: TrainConfig) -> str:
    """output_dir as an absolute path (logged so): a resume from another working folder finds the same one."""
    return os.path.abspath(os.path.expanduser(cfg.output_dir or DEFAULT_ROOT))


def run_dir(cfg: TrainConfig, run_id: str) -> str:
    return os.path.join(root_dir(cfg), run_id)


def save_arguments(cfg: TrainConfig) -> dict:
    """TrainingArguments' save settings: every `save_steps` steps, else once per epoch; at most
    `save_total_limit` kept (Trainer deletes the oldest)."""
    return {"save_strategy": "steps" if cfg.save_steps > 0 else "epoch",
            "save_steps": cfg.save_steps if cfg.save_steps > 0 else 500,  # unused with "epoch"
            "save_total_limit": cfg.save_total_limit or None}


def last_checkpoint(folder: str) -> Optional[str]:
    """The newest complete checkpoint: Trainer writes a checkpoint's files one by one, so a kill mid-save
    leaves a partial folder; LOSS_FILE is written after all of Trainer's files, so its presence marks a
    complete one."""
    if not folder or not os.path.isdir(folder):
        return None
    steps = sorted((int(n.split("-")[1]) for n in os.listdir(folder)
                    if n.startswith("checkpoint-") and n.split("-")[1].isdigit()), reverse=True)
    for step in steps:
        path = os.path.join(folder, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(path, LOSS_FILE)):
            return path
    return None


def remove(folder: str) -> None:
    """A finished run's checkpoints: gone, and the root folder too once no run is left in it."""
    shutil.rmtree(folder, ignore_errors=True)
    root = os.path.dirname(folder)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)


class LossTracking:
    """Trainer mixin: sums the per-step training loss on the device (no host sync per step), writes the sum
    into each checkpoint and restores it on resume. `train_loss` = sum / steps either way, so an
    interrupted-and-resumed run reports the same number as an uninterrupted one. The training time so far
    travels the same way, so a resumed run's `train_runtime_s` counts its earlier sessions (each up to its
    last checkpoint: steps after it were lost and trained again)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if getattr(self, "_hpml_loss_sum", None) is None:
            self._hpml_loss_sum = loss.detach().float().clone()
        else:
            self._hpml_loss_sum += loss.detach().float()
        return loss

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        if os.path.isdir(folder):
            # Written under another name, then renamed: LOSS_FILE marks a complete checkpoint, so a kill
            # mid-write must not leave it empty (resume would then fail to parse it).
            tmp = os.path.join(folder, LOSS_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"loss_sum": self.loss_sum(), "step": self.state.global_step,
                           "train_s": self.train_seconds()}, f)
            os.replace(tmp, os.path.join(folder, LOSS_FILE))

    def start_from(self, checkpoint: Optional[str]) -> None:
        import torch

        self._hpml_loss_sum, self._hpml_prior_train_s = None, 0.0
        if checkpoint and os.path.isfile(os.path.join(checkpoint, LOSS_FILE)):
            with open(os.path.join(checkpoint, LOSS_FILE)) as f:
                saved = json.load(f)
            self._hpml_loss_sum = torch.tensor(saved["loss_sum"], dtype=torch.float32, device=self.args.device)
            self._hpml_prior_train_s = float(saved.get("train_s", 0.0))  # absent in older checkpoints
        self._hpml_session_start = time.perf_counter()

    def train_seconds(self, session_s: Optional[float] = None) -> float:
        """Training time over every session: the earlier ones' (from the checkpoint) plus this one's, given
        (the Trainer's train_runtime at the end) or measured from start_from until now."""
        if session_s is None:
            session_s = time.perf_counter() - getattr(self, "_hpml_session_start", time.perf_counter())
        return getattr(self, "_hpml_prior_train_s", 0.0) + session_s

    def loss_sum(self) -> float:
        s = getattr(self, "_hpml_loss_sum", None)
        return 0.0 if s is None else float(s.item())


# ---- which run to resume, with which parameters -----------------------------------------------------------
def _typed(value: str, default):
    if isinstance(default, bool):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(default, int):
        return int(float(value))
    if isinstance(default, float):
        return float(value)
    return value


def config_of_run(params: dict[str, str], run_id: str) -> TrainConfig:
    """The TrainConfig a run was started with, from its `resolved.*` params (the logged configuration), typed
    by the task's declared parameters."""
    from hpml.config import TASK_PARAMS, declared_default

    task = params.get("resolved.task", "")
    for name in ("task", "variant", "model"):
        if f"resolved.{name}" not in params or task not in TASK_PARAMS:
            raise HpmlError(f"run {run_id} has no resolved.{name} param: it was not started by hpml training")
    values = {"variant": params["resolved.variant"]}
    for p in TASK_PARAMS[task]:
        key = f"resolved.{p.name}"
        if p.name in ("variant", "resume") or key not in params:
            continue
        raw = params[key]
        if p.name == "lr":
            values["lr"] = None if raw in ("", "None") else float(raw)
        else:
            values[p.name] = _typed(raw, declared_default(p))
    return TrainConfig(task=task, **values, resume=run_id)


def to_resume(ref: str, task: Optional[str] = None) -> TrainConfig:
    """`ref` (a run ID or 'latest') → the run's own configuration with `resume` set to its ID.

    Refuses, in one line: an unknown run, another task's run, a FINISHED run, a run still alive on this host,
    a run without a checkpoint."""
    from hpml import tracking

    ref = ref.strip()
    if ref.lower() == "latest":
        candidates = [r for r in tracking.interrupted_runs(task) if last_checkpoint(r["tags"].get(tracking.TAG_CHECKPOINT_DIR, ""))]
        if not candidates:
            raise UsageError(f"no interrupted {task or 'training'} run with a checkpoint at {tracking.tracking_uri()}: nothing to "
                             "resume (hpml runs --stale lists runs left RUNNING)")
        info = candidates[0]
    else:
        info = tracking.run_info(ref)
    run_id, tags = info["run_id"], info["tags"]
    run_task = tags.get(tracking.TAG_TASK)
    if run_task not in ("squad", "sst2"):
        raise UsageError(f"run {run_id} is not an hpml training run (task tag {run_task!r}): nothing to resume")
    if task is not None and run_task != task:
        raise UsageError(f"run {run_id} is a {tags.get(tracking.TAG_TASK)} run: resume it with "
                         f"hpml resume {run_id} (or train-{tags.get(tracking.TAG_TASK)} --resume)")
    if info["status"] == "FINISHED":
        raise UsageError(f"run {run_id} already FINISHED: there is nothing to resume")
    if info["status"] == "RUNNING" and tracking.is_alive(tags):
        raise UsageError(f"run {run_id} is still running (pid {tags.get(tracking.TAG_PID)} on "
                         f"{tags.get(tracking.TAG_HOST)}): stop it first")
    if int(float(info["params"].get("resolved.nproc", "1") or 1)) > 1:
        raise UsageError(f"run {run_id} was data-parallel: resume continues single-process runs only (data-parallel "
                         "runs keep no resumable checkpoints yet); start a new run")
    folder = tags.get(tracking.TAG_CHECKPOINT_DIR, "")
    from hpml import outage

    pending = outage.pending_of(folder)
    if pending:  # it trained to the end; only logging its end is left
        raise UsageError(f"run {run_id} finished training while its tracking server was away: log its saved "
                         f"end with hpml log-export {pending} (or hpml resume {run_id})")
    if not last_checkpoint(folder):
        raise UsageError(f"run {run_id} has no checkpoint (looked in {folder or 'nothing recorded'}): it stopped "
                         "before its first save; start a new run")
    cfg = config_of_run(info["params"], run_id)
    cfg.task = run_task
    cfg.output_dir = os.path.dirname(folder)  # absolute: resuming from another working folder finds it
    return cfg
