"""`hpml series`: a study table (or a list of variants) × seeds as nested MLflow runs, resumable, then its report.

Children run as subprocesses (`python -m hpml.cli train-<task>` joining a child run the parent created):
a crash, an out-of-memory kill or a CUDA error ends one child, not the series; every child starts with fresh
GPU memory and a fresh torch.compile state, so its numbers do not depend on what ran before it; and a child
can be killed on its own. The cost is ~5-10 s of imports per child, small next to a real training run.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import click

from hpml import tracking
from hpml.config import SQUAD_PARAMS, SST2_PARAMS, TrainConfig, small_run_note
from hpml.errors import HpmlError, UsageError
from hpml.report.study import STUDY_TABLES
from hpml.variants import Variant, get_variant

ALL = "all"
TASK_DEFAULTS = {task: {p.name: p.default for p in params} for task, params in
                 (("squad", SQUAD_PARAMS), ("sst2", SST2_PARAMS))}
PER_TASK = ("max_train_samples", "eval_batch_size", "max_length")  # "" = the task's own default
DATA_FILES = {"squad": ("train-v2.0.json", "dev-v2.0.json"), "sst2": ("train.tsv", "dev.tsv")}
REPORT_SLOT = "report"
TAG_REPORT_OF = "series_report_of"  # on the report child: a hash of the children runs it summarises


class SeriesInterrupted(HpmlError):
    """Ctrl-C: the running child and the parent end KILLED; the same command resumes."""

    exit_code = 130


class SeriesFailed(HpmlError):
    """Some children ended FAILED or KILLED; the rest (and the report) finished. Rerunning retries them."""


@dataclass
class Child:
    cfg: TrainConfig
    identity: dict[str, str]  # config hash, data fingerprint, git commit: equal means "already done"

    @property
    def slot(self) -> str:
        return f"{self.cfg.variant}/seed{self.cfg.seed}"


# ---- planning: pure, no MLflow -----------------------------------------------------------------------
def resolve_variants(name: str, cuda: bool) -> tuple[list[Variant], list[str]]:
    """The variants a series NAME runs, and one line for each CUDA-only variant skipped on a CPU.

    A study table runs its baseline first, then its variants; CUDA-only variants of a table are skipped on a
    CPU (the rest of the table is still worth measuring). A variant named explicitly in a comma list is
    refused instead: the user asked for exactly it."""
    key = (name or "").strip().lower()
    if not key:
        raise UsageError("series name is empty: pass a study table (squad-a, squad-b, squad-c, sst2, all) or "
                         "a comma list of variant IDs")
    if key in STUDY_TABLES or key == ALL:
        tables = list(STUDY_TABLES.values()) if key == ALL else [STUDY_TABLES[key]]
        ids: list[str] = []
        for t in tables:
            for vid in (t.baseline, *t.variants):
                if vid not in ids:
                    ids.append(vid)
        chosen, skipped = [], []
        for v in (get_variant(i) for i in ids):
            if v.requires_cuda and not cuda:
                skipped.append(f"skip {v.id}: needs CUDA (bitsandbytes), this machine has none")
            else:
                chosen.append(v)
        if not chosen:
            raise UsageError(f"every variant of series {key} needs CUDA: run it on a GPU machine")
        return chosen, skipped
    if "," not in key and key not in {v.id for v in _catalog()}:
        raise UsageError(f"unknown series {name!r}: pass a study table ({', '.join([*STUDY_TABLES, ALL])}) "
                         "or a comma list of variant IDs (hpml variants)")
    chosen = []
    for part in (p.strip() for p in key.split(",")):
        if not part:
            continue
        v = get_variant(part)
        if v.requires_cuda and not cuda:
            raise UsageError(f"variant {v.id} needs CUDA (bitsandbytes) and this machine has none: drop it from "
                             "the list or run the series on a GPU machine")
        if v not in chosen:
            chosen.append(v)
    return chosen, []


def _catalog() -> list[Variant]:
    from hpml.variants import CATALOG

    return list(CATALOG)


def task_data_dir(data_dir: str, task: str) -> str:
    """data_dir as given when it holds the task's files; else its `<task>/` subfolder (the layout `hpml demo`
    writes), so one series of both tasks takes one folder. Missing files: one line naming them."""
    if not data_dir:
        return ""
    for candidate in (data_dir, os.path.join(data_dir, task)):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in DATA_FILES[task]):
            return candidate
    raise UsageError(f"data_dir {data_dir!r} has no {task} data: put {' and '.join(DATA_FILES[task])} in it or "
                     f"in its {task}/ subfolder (hpml make-data {task} --out {os.path.join(data_dir, task)})")


def _int(name: str, value: str, default: int) -> int:
    if str(value).strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name} must be a whole number or empty (each task's default), got {value!r}") from None


def child_configs(variants: list[Variant], kw: dict, seeds: int, first_seed: int) -> list[TrainConfig]:
    """One training config per variant × seed, in run order (all seeds of a variant together)."""
    from hpml.cli import parse_bool, parse_lr

    if seeds < 1:
        raise UsageError(f"seeds must be 1 or more, got {seeds}")
    if kw["purpose"] not in tracking.PURPOSES:
        raise UsageError(f"purpose must be one of {', '.join(tracking.PURPOSES)}, got {kw['purpose']!r}")
    register, lr = parse_bool("register", kw["register"]), parse_lr(kw["lr"])
    out = []
    for v in variants:
        d = TASK_DEFAULTS[v.task]
        for seed in range(first_seed, first_seed + seeds):
            out.append(TrainConfig(
                task=v.task, variant=v.id, model=kw["model"], data_dir=task_data_dir(kw["data_dir"], v.task),
                max_train_samples=_int("max_train_samples", kw["max_train_samples"], d["max_train_samples"]),
                max_eval_samples=kw["max_eval_samples"], epochs=float(kw["epochs"]), max_steps=kw["max_steps"],
                batch_size=kw["batch_size"],
                eval_batch_size=_int("eval_batch_size", kw["eval_batch_size"], d["eval_batch_size"]),
                max_length=_int("max_length", kw["max_length"], d["max_length"]), lr=lr, seed=seed,
                experiment="", register=register, purpose=kw["purpose"], save_steps=kw.get("save_steps", 0),
                doc_stride=kw["doc_stride"] if v.task == "squad" else TrainConfig.doc_stride))
    return out


def cli_args(cfg: TrainConfig) -> list[str]:
    """The `hpml train-<task>` command line that trains exactly `cfg` (the child's own parser reads it)."""
    args = [f"train-{cfg.task}"]
    fields = ["variant", "model", "data_dir", "max_train_samples", "max_eval_samples", "epochs", "max_steps",
              "batch_size", "eval_batch_size", "max_length", "lr", "seed", "experiment", "register", "purpose",
              "save_steps"]
    if cfg.task == "squad":
        fields += ["doc_stride", "n_best", "max_answer_length", "null_threshold"]
    for f in fields:
        value = getattr(cfg, f)
        value = "" if value is None else ("true" if value is True else "false" if value is False else value)
        args += ["--" + f.replace("_", "-"), str(value)]
    return args


def series_key(name: str, kw: dict) -> str:
    """The parent's identity: the same NAME and training params find the same parent. Seeds are left out, so
    `seeds=3` after `seeds=2` adds the third seed to the same series; so is how often children checkpoint."""
    keep = {k: str(v) for k, v in kw.items() if k not in ("seeds", "experiment", "out", "save_steps")}
    return hashlib.sha256(json.dumps({"name": name.strip().lower(), **keep}, sort_keys=True).encode()).hexdigest()[:16]


def fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---- running ------------------------------------------------------------------------------------------
def run_series(name: str, seeds: int, seed: int, out: str, experiment: str, **kw) -> str:
    """Plan, find or create the parent, run the missing children, then the report. Returns the parent run ID;
    raises SeriesFailed (exit 1) when some child failed: rerunning the same command retries only those."""
    if seeds < 1:
        raise UsageError(f"seeds must be 1 or more, got {seeds}")
    # Names and data folders are checked before torch loads (seconds): a typo costs one quick line.
    for task in dict.fromkeys(v.task for v in resolve_variants(name, cuda=True)[0]):
        task_data_dir(kw["data_dir"], task)
    import torch
    from mlflow import MlflowClient

    from hpml import modeling
    from hpml.training import run_identity

    variants, skipped = resolve_variants(name, torch.cuda.is_available())
    for line in skipped:
        click.echo(line)
    cfgs = child_configs(variants, kw, seeds, seed)
    note = next((n for n in (small_run_note(c.task, c.purpose, c.max_steps, c.max_train_samples) for c in cfgs) if n),
                None)
    if note:
        click.echo(f"hpml: note: {note}", err=True)
    modeling.resolve_model_ref(kw["model"])  # a bad model fails here, once, not in every child
    commit = tracking.git_commit()
    children = [Child(c, {**run_identity(c), tracking.TAG_GIT_COMMIT: commit}) for c in cfgs]

    uri = tracking.connect()
    client = MlflowClient()
    key = series_key(name, {**kw, "seed": seed})
    label = name.strip().lower()
    parent_id, exp_id = _parent(client, label, key, experiment, kw, seeds, seed, variants)
    out_dir = out or os.path.join("report", f"series-{label.replace(',', '+')}")
    click.echo(f"series {label}: {len(variants)} variant(s) × {seeds} seed(s) = {len(children)} runs + report; "
               f"parent run {parent_id} at {uri}")

    existing = _children_by_slot(client, exp_id, parent_id)
    failed, durations, t0 = [], [], time.time()
    todo = [c for c in children if not _done(existing.get(c.slot, []), c)]
    n_total, n_done = len(children), len(children) - len(todo)
    for c in children:
        if c not in todo:
            run = _done(existing[c.slot], c)
            click.echo(f"[{children.index(c) + 1}/{n_total}] {c.slot}: kept FINISHED run {run.info.run_id} "
                       "(same config hash, git commit and data fingerprint)")
            _drop_checkpoints(existing[c.slot], keep=None)
    for stale in (r for runs in existing.values() for r in runs if r.info.status == "RUNNING"):
        client.set_terminated(stale.info.run_id, "KILLED")  # its process is gone: the series is ours now
    try:
        for c in todo:
            attempts = existing.get(c.slot, [])
            resume = _resumable(attempts, c)
            _drop_checkpoints(attempts, keep=resume[0] if resume else None)
            status, run_id, took, why = _run_child(client, exp_id, parent_id, label, c, uri, n_done + 1, n_total,
                                                   resume)
            n_done += 1
            durations.append(took)
            left = len(todo) - len(durations)
            eta = fmt_s(sum(durations) / len(durations) * left) if left else "0s"
            click.echo(f"[{n_done}/{n_total}] {c.slot}: {status} in {fmt_s(took)} (run {run_id}){why}; "
                       f"elapsed {fmt_s(time.time() - t0)}, ETA {eta}")
            if status != "FINISHED":
                failed.append(c.slot)
        report_id = _run_report(client, exp_id, parent_id, label, uri, out_dir)
    except KeyboardInterrupt:
        client.set_terminated(parent_id, "KILLED")
        raise SeriesInterrupted("series interrupted: rerun the same command to resume it") from None
    client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    if report_id:
        click.echo(f"report: {out_dir}/report.md (run {report_id})")
    if failed:
        raise SeriesFailed(f"{len(failed)} of {n_total} runs did not finish ({', '.join(failed)}): rerun the same "
                           "command to retry only those (a killed one resumes from its last checkpoint)")
    return parent_id


def _parent(client, label, key, experiment, kw, seeds, seed, variants) -> tuple[str, str]:
    """(parent run ID, experiment ID). Under `mlflow run` the run it made is the parent, unless an earlier
    run of the same series exists: then that one stays the parent and this run points at it."""
    here = os.environ.get("MLFLOW_RUN_ID")
    if here:
        exp_id = client.get_run(here).info.experiment_id
    else:
        exp = client.get_experiment_by_name(experiment or tracking.DEFAULT_EXPERIMENT["series"])
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment or "hpml-series")
    earlier = [r for r in client.search_runs([exp_id], f"tags.{tracking.TAG_SERIES_KEY} = '{key}' and "
                                                        f"tags.{tracking.TAG_TASK} = 'series'",
                                             order_by=["attributes.start_time ASC"])
               if r.info.run_id != here]
    desc = (f"series {label}: {', '.join(v.id for v in variants)} × {seeds} seed(s) from {seed}, model "
            f"{kw['model']}, purpose {kw['purpose']}. Children: one run per variant × seed, then the report.")
    tags = {tracking.TAG_TASK: "series", tracking.TAG_SERIES: label, tracking.TAG_SERIES_KEY: key,
            tracking.TAG_PURPOSE: kw["purpose"], tracking.TAG_GIT_COMMIT: tracking.git_commit(),
            tracking.TAG_DESCRIPTION: desc}
    if earlier:
        parent = earlier[0].info.run_id
        client.update_run(parent, status="RUNNING")
        if here:
            client.set_tag(here, tracking.TAG_SERIES_RESUMED, parent)
            client.set_tag(here, tracking.TAG_DESCRIPTION, f"resumed series {label} in run {parent}: its "
                                                           "children and report are there")
        return parent, exp_id
    if here:
        for k, v in tags.items():
            client.set_tag(here, k, v)
        client.set_tag(here, "mlflow.runName", f"series {label}")
        return here, exp_id
    run = client.create_run(exp_id, run_name=f"series {label}", tags=tags)
    for k, v in {"name": label, "seeds": seeds, "seed": seed, **kw}.items():
        client.log_param(run.info.run_id, k, "" if v is None else v)
    return run.info.run_id, exp_id


def _children_by_slot(client, exp_id, parent_id) -> dict[str, list]:
    runs = client.search_runs([exp_id], f"tags.{tracking.TAG_PARENT} = '{parent_id}'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
    by: dict[str, list] = {}
    for r in runs:
        by.setdefault(r.data.tags.get(tracking.TAG_SERIES_CHILD, ""), []).append(r)
    return by


def _same_identity(run, child: Child) -> bool:
    """Whether `run` trained what `child` would (same config hash, git commit, data fingerprint)."""
    return all(run.data.tags.get(k) == v for k, v in child.identity.items())


def _done(runs: list, child: Child):
    """The FINISHED run that already did `child` (same config hash, git commit, data fingerprint), or None."""
    for r in runs:
        if r.info.status == "FINISHED" and _same_identity(r, child):
            return r
    return None


def _resumable(runs: list, child: Child) -> Optional[tuple[str, str]]:
    """(run ID, its last complete checkpoint) of a killed attempt at `child` with the same identity, to
    continue rather than train again from step 0; None when there is none. A FAILED attempt trains again
    from the start: what failed it would likely fail its resume too."""
    from hpml import checkpoints

    for r in runs:  # newest first
        if r.info.status not in ("KILLED", "RUNNING") or not _same_identity(r, child):  # RUNNING: its
            continue  # process is gone (marked KILLED above)
        at = checkpoints.last_checkpoint(r.data.tags.get(tracking.TAG_CHECKPOINT_DIR, ""))
        if at:
            return r.info.run_id, at
    return None


def _drop_checkpoints(runs: list, keep: Optional[str]) -> None:
    """Checkpoints of a slot's earlier attempts that the series will never continue (it resumes `keep`, or
    trains anew): without this each killed or failed attempt left its folder on disk for good."""
    from hpml import checkpoints

    for r in runs:
        folder = r.data.tags.get(tracking.TAG_CHECKPOINT_DIR, "")
        if r.info.run_id != keep and r.info.status != "FINISHED" and folder and os.path.isdir(folder):
            checkpoints.remove(folder)
            click.echo(f"removed the checkpoints of run {r.info.run_id} ({r.info.status}, not continued): {folder}")


def _spawn(args: list[str], run_id: str, exp_id: str, uri: str, log_path: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": exp_id, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "hpml.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env)


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("hpml: error:") or "Error" in ln.split(":")[0]]
    return (errors or lines or [""])[-1][:300]


def _finish(client, run_id: str, proc: subprocess.Popen, log_path: str) -> str:
    """Wait for the child, make sure its run is terminated, attach its log; returns the run's status."""
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too (same process group): let it end its run
        proc.send_signal(signal.SIGINT)
        proc.wait()
        client.set_terminated(run_id, "KILLED") if client.get_run(run_id).info.status == "RUNNING" else None
        raise
    status = client.get_run(run_id).info.status
    if status == "RUNNING":  # killed before it could end its own run (SIGKILL, OOM killer)
        status = "KILLED" if code < 0 else "FAILED"
        client.set_terminated(run_id, status)
    elif code != 0 and status == "FINISHED":
        status = "FAILED"
        client.set_terminated(run_id, status)
    try:
        client.log_artifact(run_id, log_path)
    except Exception:  # the log is a convenience; losing it must not fail the series
        pass
    return status


def _run_child(client, exp_id, parent_id, label, c: Child, uri, index, total,
               resume: Optional[tuple[str, str]] = None):
    """Train one child in a subprocess: a new run, or `hpml resume` of a killed attempt's run (`resume`: its
    ID and the checkpoint it continues from, as _resumable found them)."""
    if resume:
        run_id, at = resume
        args, log_name, doing = ["resume", run_id], "resume.log", f"resuming from {os.path.basename(at)}"
    else:
        tags = {tracking.TAG_PARENT: parent_id, tracking.TAG_SERIES: label, tracking.TAG_SERIES_CHILD: c.slot,
                tracking.TAG_TASK: c.cfg.task, tracking.TAG_VARIANT: c.cfg.variant,
                tracking.TAG_PURPOSE: c.cfg.purpose}
        run_id = client.create_run(exp_id, run_name=c.cfg.variant, tags=tags).info.run_id
        args, log_name, doing = cli_args(c.cfg), "train.log", "running"
    log_path = os.path.join(tempfile.mkdtemp(prefix="hpml-series-"), log_name)
    t = time.time()
    proc = _spawn(args, run_id, exp_id, uri, log_path)
    click.echo(f"[{index}/{total}] {c.slot}: {doing} (pid {proc.pid}, run {run_id}, log {log_path})")
    status = _finish(client, run_id, proc, log_path)
    why = "" if status == "FINISHED" else f": {_last_error(log_path) or 'exit ' + str(proc.returncode)}"
    return status, run_id, time.time() - t, why


def _run_report(client, exp_id, parent_id, label, uri, out_dir) -> Optional[str]:
    """The last child: the report of the newest FINISHED child of each slot. Skipped when a FINISHED report
    child already covers exactly those runs (rerunning a complete series creates no new child)."""
    slots = _children_by_slot(client, exp_id, parent_id)
    used = sorted(next((r.info.run_id for r in runs if r.info.status == "FINISHED"), "")
                  for slot, runs in slots.items() if slot != REPORT_SLOT)
    used = [u for u in used if u]
    if not used:
        click.echo("report: skipped, no child finished")
        return None
    covers = hashlib.sha256(",".join(used).encode()).hexdigest()[:16]
    for r in slots.get(REPORT_SLOT, []):
        if r.info.status == "FINISHED" and r.data.tags.get(TAG_REPORT_OF) == covers:
            click.echo(f"report: kept FINISHED run {r.info.run_id} (same {len(used)} runs)")
            return r.info.run_id
    tags = {tracking.TAG_PARENT: parent_id, tracking.TAG_SERIES: label, tracking.TAG_SERIES_CHILD: REPORT_SLOT,
            TAG_REPORT_OF: covers}
    run_id = client.create_run(exp_id, run_name=tracking.REPORT_RUN_NAME, tags=tags).info.run_id
    log_path = os.path.join(tempfile.mkdtemp(prefix="hpml-series-"), "report.log")
    args = ["report", "--tracking-uri", uri, "--out", out_dir, "--formats", "md,csv", "--experiments", "",
            "--purpose", "", "--series-run", parent_id]
    proc = _spawn(args, run_id, exp_id, uri, log_path)
    status = _finish(client, run_id, proc, log_path)
    if status != "FINISHED":
        raise HpmlError(f"the series' report failed: {_last_error(log_path)} (log {log_path})")
    return run_id
