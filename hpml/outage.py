"""A run's end (artifacts, registration), and what happens when its tracking server is away at that moment:
the export saved under output_dir, and `hpml log-export`, which logs it once the server is back.

Metrics logged while training are buffered (tracking.MetricBuffer), so a lost server never stops training.
At the end the run waits at most HPML_SERVER_WAIT_S (default 600 s) for the server to take everything
buffered. If it does not, everything the end still has to log goes to `<output_dir>/<run ID>/pending-export`:
the model export (when registering), the artifacts (predictions …), every metric and tag the server has not
acknowledged (with its step and timestamp) and what registration needs; the checkpoints are deleted
(training is complete). One line names the folder and the command. `hpml log-export FOLDER` (or `hpml
resume RUN_ID`) then does exactly what the run's own end would have done, in the same run: metrics at their
steps, artifacts, one registry version under the champion rule, FINISHED.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Optional

from hpml import checkpoints, tracking
from hpml.errors import HpmlError, UsageError

PENDING_DIR = "pending-export"
PENDING_FILE = "pending.json"  # written last: a folder without it is an incomplete save


@dataclasses.dataclass
class Ending:
    """What a trained run's end logs, with where its files are now."""

    run_id: str
    task: str
    variant: str
    register: bool
    quantized: bool  # a 4-bit base: the pyfunc's requirements add bitsandbytes
    headline: str  # the metric `champion` compares
    metrics: dict  # the final metrics (the registry version's tags take theirs from here)
    tags: dict  # the run's tags (the version carries them)
    artifacts_dir: str  # predictions.json …
    export_dir: str  # the model export; "" when not registering
    checkpoint_dir: str  # the run's checkpoints, deleted once the run is FINISHED ("" = none)


def finish(end: Ending, save_root: str) -> dict:
    """The end of a trained run whose final metrics are already logged (buffered): wait for the server,
    then log artifacts and register. Server still away after the bounded wait (or lost during these
    calls): save the export under `save_root` and raise ServerLost naming it."""
    if not tracking.await_server(note=_say_waiting):
        raise _lost(end, save_root)
    try:
        return _log_end(end)
    except Exception as exc:  # a server that died between the wait and these calls: keep the model
        if tracking.server_reachable():
            raise
        raise _lost(end, save_root) from exc


def _log_end(end: Ending) -> dict:
    from hpml import serving
    from hpml.tasks import get_task

    tracking.log_artifacts(end.artifacts_dir)
    summary: dict[str, object] = {}
    if end.register:
        name = tracking.registered_model_name(end.task, end.variant)
        model = serving.model_spec(get_task(end.task), quantized=end.quantized)
        version, champion = tracking.register_model(end.export_dir, name, model, end.headline, end.metrics,
                                                    end.tags)
        summary.update(registered=name, version=version, champion=champion)
    if end.checkpoint_dir:
        checkpoints.remove(end.checkpoint_dir)  # finished: the registry (or the run's artifacts) holds it
    return summary


def _say_waiting(buffer) -> None:
    since = time.strftime("%H:%M:%S", time.localtime(buffer.down_since))
    wait = tracking.env_seconds(tracking.SERVER_WAIT_ENV, tracking.SERVER_WAIT_DEFAULT)
    print(f"hpml: note: tracking server {buffer.uri} unreachable since {since} ({buffer.last_error}); "
          f"training is done, waiting up to {wait:g} s ({tracking.SERVER_WAIT_ENV}) for it to take "
          f"{len(buffer.pending())} buffered metrics, the artifacts and the model", file=sys.stderr, flush=True)


def _lost(end: Ending, save_root: str) -> tracking.ServerLost:
    pending, since, error = tracking.buffered()
    path = save(end, pending, os.path.join(save_root, PENDING_DIR))
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: it ends at once too (hpml.mlflow_plugin)
        from hpml.mlflow_plugin import lost_marker

        with open(lost_marker(os.getppid()), "w") as f:
            f.write(end.run_id)
    when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}" if since else ""
    return tracking.ServerLost(
        f"tracking server {tracking.tracking_uri()} unreachable{when}: run {end.run_id}'s model, metrics and "
        f"artifacts are saved in {path}; once the server is back, log them with: hpml log-export {path}")


def save(end: Ending, pending: list[tuple], path: str) -> str:
    """Write the export folder (model, artifacts, pending.json last) and delete the run's checkpoints."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    shutil.copytree(end.artifacts_dir, os.path.join(path, "artifacts"))
    if end.register:
        shutil.copytree(end.export_dir, os.path.join(path, "model"))
    record = {**dataclasses.asdict(end), "artifacts_dir": "artifacts", "export_dir": "model" if end.register else "",
              "tracking_uri": tracking.tracking_uri(),
              "pending": [list(row) for row in pending]}
    with open(os.path.join(path, PENDING_FILE + ".tmp"), "w") as f:
        json.dump(record, f)
    os.replace(os.path.join(path, PENDING_FILE + ".tmp"), os.path.join(path, PENDING_FILE))
    if end.checkpoint_dir:  # training is complete: the export is all a later end needs
        for name in os.listdir(end.checkpoint_dir):
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(end.checkpoint_dir, name), ignore_errors=True)
    return os.path.abspath(path)


def read(path: str) -> tuple[Ending, list[tuple], str]:
    """An export folder → (its Ending with absolute paths, the pending rows, the tracking URI it came from)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.basename(path) != PENDING_DIR and os.path.isfile(os.path.join(path, PENDING_DIR, PENDING_FILE)):
        path = os.path.join(path, PENDING_DIR)  # the run's folder was given
    record_file = os.path.join(path, PENDING_FILE)
    if not os.path.isfile(record_file):
        raise UsageError(f"{path} is not a pending export of hpml (no {PENDING_FILE}): pass the folder the "
                         "run's last line named")
    try:
        with open(record_file) as f:
            record = json.load(f)
        uri, pending = record.pop("tracking_uri"), [tuple(row) for row in record.pop("pending")]
        end = Ending(**record)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise HpmlError(f"{record_file} is unreadable ({exc}): the export is damaged") from None
    end.artifacts_dir = os.path.join(path, end.artifacts_dir)
    end.export_dir = os.path.join(path, end.export_dir) if end.export_dir else ""
    return end, pending, uri


def pending_of(checkpoint_dir: str) -> Optional[str]:
    """The pending export in a run's folder, if there is one."""
    path = os.path.join(checkpoint_dir or "", PENDING_DIR)
    return path if checkpoint_dir and os.path.isfile(os.path.join(path, PENDING_FILE)) else None


def log_export(path: str, uri: str = "") -> dict:
    """Log a pending export into its run, exactly as the run's own end would have: the buffered metrics and
    tags (steps and timestamps kept), the artifacts, one registry version, FINISHED; then delete the folder.
    Safe to run again after a failure: the store ignores metrics it already has."""
    end, pending, recorded_uri = read(path)
    uri = tracking.connect(uri or recorded_uri,
                           model=tracking.registered_model_name(end.task, end.variant) if end.register else "")
    with tracking.reopen_run(end.run_id):
        tracking.log_rows(end.run_id, pending)
        summary = _log_end(end)
    folder = os.path.dirname(end.artifacts_dir)  # gone already when it sat in the run's checkpoint folder
    shutil.rmtree(folder, ignore_errors=True)
    if os.path.isdir(os.path.dirname(folder)) and not os.listdir(os.path.dirname(folder)):
        checkpoints.remove(os.path.dirname(folder))
    return {"run_id": end.run_id, "task": end.task, "variant": end.variant, "metrics": end.metrics, **summary}
