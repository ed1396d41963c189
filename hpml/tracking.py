"""Every MLflow call hpml makes: run setup, tag/param/metric names, artifacts, registry and aliases."""
from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.error
import urllib.parse
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
TAG_RECIPE = "recipe_hash"  # config hash without the seed, + data fingerprint: runs that are seed repeats
TAG_PRECISION = "precision"  # what ran: fp32 | fp16 | bf16 (autocast) | nf4-fp16 | nf4-bf16 (4-bit base)
TAG_ATTENTION = "attention"  # the attention implementation the trained model really used (eager | sdpa | hpml_varlen)
TAG_COMPILED = "compiled"  # the torch.compile backend the Trainer really wrapped the model with, or "no"
TAG_VERSIONS_PREFIX = "version."  # version.torch, version.transformers, …
TAG_HOST = "hpml.host"  # where the run's process lives: with TAG_PID, finds runs left RUNNING by kill -9
TAG_PID = "hpml.pid"
TAG_HIDDEN_IMPORTS = "hpml.hidden_imports"  # packages the run's process kept out (hpml.lean), comma-separated
TAG_CHECKPOINT_DIR = "hpml.checkpoint_dir"  # this run's checkpoints (hpml resume reads it)
TAG_RESUMED_AT = "hpml.resumed_at_step"  # set when a run was continued from a checkpoint
TAG_DESCRIPTION = "mlflow.note.content"  # the run's description in the UI: variant, model, seed, data
TAG_PARENT = "mlflow.parentRunId"  # nested runs: a series' children point at its parent run
TAG_SERIES = "series"  # a series' name, on its parent and on every child
TAG_SERIES_KEY = "series_key"  # the parent's identity: the same command finds (and resumes) the same parent
TAG_SERIES_CHILD = "series_child"  # a child's slot in its series: "<variant>/seed<N>" or "report"
TAG_SERIES_RESUMED = "series_resumed_into"  # on a run `mlflow run` made for a resumed series: the parent

PURPOSES = ("demo", "test", "real")
TASKS = ("squad", "sst2", "mnli", "vram", "report", "series")

# Metrics shared by both tasks (units in the names)
M_TRAIN_LOSS = "train_loss"
M_TRAIN_RUNTIME = "train_runtime_s"
M_TRAIN_SPS = "train_samples_per_s"  # SQuAD: features (windows) per second; Trainer's, warm-up included
M_TRAIN_STEADY_SPS = "train_steady_samples_per_s"  # after the first steps (compile, allocator warm-up)
M_COMPILE = "train_compile_s"  # torch.compile and CUDA-graph recording inside training (not in the steady rate)
M_RECOMPILES = "train_recompiles_after_warmup"  # graphs compiled after the steady rate's warm-up steps
M_PAUSED = "train_checkpoint_eval_s"  # checkpoint saves and evaluations inside training (not in the steady rate)
M_STARTUP = "startup_s"  # process start to the first training step's start (this session's, when resumed)
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
                      "report": "hpml-report", "series": "hpml-series", "bench": "hpml-bench"}
CHAMPION = "champion"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def registered_model_name(task: str, variant_id: str) -> str:
    return f"hpml-{task}-{variant_id.lower()}"


# ---- connection --------------------------------------------------------------------------------------


def tracking_uri(explicit: str = "") -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else the project's SQLite default."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect(explicit: str = "", experiment: str = "", model: str = "") -> str:
    """Point MLflow at the store; for a server, fail fast (5 s, no retries) with one line instead of the
    client's ~4 min of retries or a 401/403 traceback halfway through a run.

    A server is checked in order: /health (reachable), an experiments search with the client's credentials
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: 401 = wrong or missing, 403 = no read access),
    then, on a basic-auth server and for a non-admin, EDIT on `experiment` and on the registered `model`
    where they already exist (a missing one the user creates and then manages)."""
    import mlflow

    uri = tracking_uri(explicit)
    if uri.startswith("sqlite:"):
        from hpml.store import init_sqlite

        init_sqlite(uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri.rstrip("/"), experiment, model)
    mlflow.set_tracking_uri(uri)
    return uri


CAN_WRITE = ("EDIT", "MANAGE")  # basic-auth permissions that may log runs / add model versions


def check_health(uri: str, timeout: float = 5.0) -> None:
    """One GET of the server's /health, no retries: an unreachable or unhealthy server is one line."""
    uri = uri.rstrip("/")
    try:
        with urllib.request.urlopen(uri + "/health", timeout=timeout) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise HpmlError(f"tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}): start it "
                        "(mlflow server) or set MLFLOW_TRACKING_URI to a reachable server or sqlite:///mlflow.db")
    if not ok:
        raise HpmlError(f"tracking server {uri} answered /health with an error: check the server's log")


def _check_server(uri: str, experiment: str, model: str) -> None:
    check_health(uri)
    # /health answers everyone: only an authenticated endpoint tells whether the credentials work.
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)  # the env variables MLflow's client itself reads
    user = creds.username or ""
    status, _ = _get(uri, "/api/2.0/mlflow/experiments/search?max_results=1", creds)
    if status == 401:
        if not user:
            raise HpmlError(f"tracking server {uri} requires a login: set MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD to a user its admin created")
        raise HpmlError(f"tracking server {uri} rejected the password of user {user!r} (401): check "
                        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or ask the server's admin to reset it")
    if status == 403:
        raise HpmlError(f"user {user!r} may not read experiments on {uri} (403): ask the server's admin for READ")
    if status != 200:
        raise HpmlError(f"tracking server {uri} answered an experiments search with HTTP {status}: check the server's log")
    if not (experiment or model) or not user:
        return
    status, me = _get(uri, "/api/2.0/mlflow/users/current", creds)
    if status != 200 or me.get("user", {}).get("is_admin"):
        return  # no basic-auth app (nothing to check), or an admin, who may do everything
    targets = []
    if experiment and not os.environ.get("MLFLOW_RUN_ID"):  # under mlflow run the run exists already
        status, found = _get(uri, "/api/2.0/mlflow/experiments/get-by-name?"
                             + urllib.parse.urlencode({"experiment_name": experiment}), creds)
        if status == 200:
            targets.append(("experiment", found["experiment"]["experiment_id"], f"experiment {experiment!r}",
                            "logging runs into it", "choose another experiment"))
        elif status == 403:
            raise HpmlError(f"user {user!r} may not read experiment {experiment!r} on {uri} (403): ask its owner or "
                            "the server's admin for EDIT (docs/team-server.md), or choose another experiment")
    if model:
        status, _ = _get(uri, "/api/2.0/mlflow/registered-models/get?" + urllib.parse.urlencode({"name": model}),
                         creds)
        if status == 200:
            targets.append(("registered_model", model, f"registered model {model!r}",
                            "registering a version of it", "train with register=false"))
        elif status == 403:
            raise HpmlError(f"user {user!r} may not read registered model {model!r} on {uri} (403): ask its owner "
                            "or the server's admin for EDIT (docs/team-server.md), or train with register=false")
    for rtype, rid, label, action, alternative in targets:
        query = urllib.parse.urlencode({"username": user, "resource_type": rtype, "resource_id": rid})
        status, perm = _get(uri, "/api/3.0/mlflow/users/permissions/get?" + query, creds)
        if status == 200 and perm.get("permission") not in CAN_WRITE:
            raise HpmlError(f"user {user!r} has {perm.get('permission')} on {label} at {uri}, and {action} needs "
                            f"EDIT (403): ask its owner or the server's admin to grant it (docs/team-server.md), "
                            f"or {alternative}")


def _get(uri: str, path: str, creds) -> tuple[int, dict]:
    """One GET with the client's credentials, no retries: (HTTP status, JSON body or {}). 30 s: the server
    answered /health, so a slow answer means a busy server (the first request of each worker sets it up), not
    a dead one."""
    import base64
    import json

    req = urllib.request.Request(uri + path)
    if creds.username and creds.password:
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    elif creds.token:
        req.add_header("Authorization", f"Bearer {creds.token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise HpmlError(f"tracking server {uri} stopped answering ({getattr(exc, 'reason', exc)}): check the server")
    try:
        return status, json.loads(body or b"{}")
    except ValueError:
        return status, {}


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
        resolved: dict[str, object], resume_run_id: str = "", *, system_metrics: bool = False) -> Iterator[str]:
    """One MLflow run: continues `resume_run_id` if given, else joins the run `mlflow run` created
    (MLFLOW_RUN_ID), else creates one in `experiment`.

    Params: the inputs as given under their plain names (mlflow run logs those itself, as typed) and the
    resolved configuration under `resolved.*` / `variant.*`, so every run has the same keys either way.
    Ends FINISHED only when the body returns; SIGINT/SIGTERM (KeyboardInterrupt) end it KILLED, any other
    exception FAILED, and the exception propagates.
    `system_metrics`: MLflow samples CPU/GPU utilisation, memory and power every 10 s into `system/*` metrics.
    """
    import socket

    import mlflow

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        if run_id and run_id != resume_run_id:  # `mlflow run -P resume=…` made a run of its own: point it there
            mlflow.MlflowClient().set_tag(run_id, "mlflow.note.content",
                                          f"hpml resumed run {resume_run_id}: its metrics and model are there")
        # sets the run RUNNING again
        active = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
    elif run_id:
        active = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        exp = mlflow.get_experiment(active.info.experiment_id)
        if experiment and experiment not in (exp.name, DEFAULT_EXPERIMENT.get(task)):
            mlflow.end_run("FAILED")
            raise UsageError(f"experiment={experiment!r} cannot move a run that mlflow run created in "
                             f"{exp.name!r}: use mlflow run --experiment-name {experiment} instead")
    else:
        exp = mlflow.set_experiment(experiment or DEFAULT_EXPERIMENT[task])
        active = mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics)
    try:
        mlflow.set_tags({"mlflow.runName": run_name, TAG_TASK: task, TAG_GIT_COMMIT: git_commit(),
                         TAG_DEVICE: device_name(), **library_versions(), **tags,
                         TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())})
        already = mlflow.get_run(active.info.run_id).data.params
        log_params({k: v for k, v in inputs.items() if k not in already})
        log_params(resolved)
        _start_buffer(active.info.run_id)
        yield active.info.run_id
    except ServerLost:
        _leave_run()  # the run stays RUNNING on the server: `hpml log-export` ends it FINISHED
        raise
    except KeyboardInterrupt:
        _end_run("KILLED")
        raise
    except BaseException:
        _end_run("FAILED")
        raise
    _end_run("FINISHED")


@contextlib.contextmanager
def child_run(task: str, run_name: str, tags: dict[str, str]) -> Iterator[str]:
    """A run nested in the active one (`hpml bench` rows): FINISHED when the body returns, else FAILED."""
    import mlflow

    with mlflow.start_run(run_name=run_name, nested=True) as active:
        mlflow.set_tags({"mlflow.runName": run_name, TAG_TASK: task, TAG_DEVICE: device_name(), **tags})
        yield active.info.run_id


def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


def system_metrics_wanted(device: str) -> bool:
    """On by default on CUDA (GPU utilisation, memory, power in the UI); MLflow's own switch
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off (=true turns them on on a CPU too)."""
    value = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
    if value:
        return value in ("true", "1", "yes")
    return device == "cuda"


def log_datasets(inputs: list[dict]) -> None:
    """Log each dataset the run read as an MLflow input (the UI's Datasets column): name, digest, source
    (a local file, or hub ID + config + split + revision) and context (train | eval). Only metadata travels:
    logging the rows would copy the data into the store."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    for item in inputs:
        if "path" in item:
            with warnings.catch_warnings():  # MLflow registers the local source twice and says so each time
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(item["path"])
        else:
            hub = item["hub"]
            source = HuggingFaceDatasetSource(path=hub["path"], config_name=hub["config_name"], split=hub["split"],
                                              revision=hub["revision"])
        dataset = MetaDataset(source, name=item["name"], digest=item["digest"])
        for attempt in range(3):
            try:
                mlflow.log_input(dataset, context=item["context"])
                break
            except Exception as exc:  # MLflow's server races concurrent runs inserting the same dataset row
                # PostgreSQL says "already exists", SQLite "UNIQUE constraint failed"
                if attempt == 2 or not any(m in str(exc) for m in ("already exists", "UNIQUE constraint failed")):
                    raise
                import time

                time.sleep(0.5)  # the other run's row now exists: a retry links this run to it


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
    """Log to the active run; on a tracking server, through the run's buffer (never blocks on the server)."""
    import mlflow

    values = {k: float(v) for k, v in metrics.items() if v is not None}
    buffer = _run_buffer()
    if buffer is not None:
        buffer.add([("metric", k, v, step or 0) for k, v in values.items()])
        return
    mlflow.log_metrics(values, step=step)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    buffer = _run_buffer()
    if buffer is not None:
        buffer.add([("tag", k, str(v), 0) for k, v in tags.items()])
        return
    mlflow.set_tags(tags)


# ---- server outages: what a run logs while its tracking server is away -------------------------------------
# Bounds, each overridable in the environment (tests use small values):
SERVER_WAIT_ENV = "HPML_SERVER_WAIT_S"  # how long a run's end waits for a lost server before saving an export
SERVER_WAIT_DEFAULT = 600.0  # a server restart or a short network cut, not a day-long outage
RETRY_MAX_ENV = "HPML_SERVER_RETRY_S"  # longest pause between two tries of the buffered data
RETRY_MAX_DEFAULT = 30.0
REQUEST_TIMEOUT_S = 10.0  # one try of one batch: a live server answers a log-batch in milliseconds
BATCH = 1000  # MLflow's log-batch limit on metrics per request
BATCH_ROWS = 500  # metrics and tags per request of the buffer: within log-batch's 1000 entries (100 tags)


def env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        return max(0.0, float(value)) if value else default
    except ValueError:
        raise UsageError(f"{name} must be a number of seconds, got {value!r}") from None


class ServerLost(HpmlError):
    """The tracking server stayed away at a run's end: the run's export is on disk (exit 3)."""

    exit_code = 3


class MetricBuffer:
    """Metrics and tags of one run on a tracking server, sent by a background thread.

    Training only appends to a list, so a lost server never stalls a step and `train_runtime_s` never
    counts time spent on the server. The thread sends what is pending as MLflow log-batch requests (one
    try each, REQUEST_TIMEOUT_S) and, while the server is away, tries again after 0.5, 1, 2 … s, at most
    `HPML_SERVER_RETRY_S` apart, keeping everything with its step and original timestamp. A server that
    answers with a client error (4xx: the data is wrong, not the server away) is not retried: the next
    call from the run raises it, as a direct call would have."""

    def __init__(self, uri: str, run_id: str):
        import threading

        self.uri, self.run_id = uri.rstrip("/"), run_id
        self.retry_max = env_seconds(RETRY_MAX_ENV, RETRY_MAX_DEFAULT)
        self.items: list[tuple] = []  # (kind, key, value, step, timestamp ms); kind "metric" | "tag"
        self.cond = threading.Condition()
        self.down_since: Optional[float] = None  # time.time() of the first failed try; None while it answers
        self.last_error = ""
        self.fatal: Optional[BaseException] = None
        self.closed = False
        self._wake = False  # set by drain(): someone waits for the server, try again now
        self.thread = threading.Thread(target=self._loop, name="hpml-metric-buffer", daemon=True)
        self.thread.start()

    def add(self, rows: list[tuple]) -> None:
        import time

        ts = int(time.time() * 1000)
        with self.cond:
            self._raise_fatal()
            self.items.extend((*row, ts) for row in rows)
            self.cond.notify_all()

    def pending(self) -> list[tuple]:
        with self.cond:
            return list(self.items)

    def drain(self, timeout: float, on_wait=None) -> bool:
        """Wait until everything is sent (True) or `timeout` s pass with the server still away (False).
        `on_wait(buffer)` is called once, when the first try fails, so the caller can say it is waiting."""
        import time

        deadline = time.monotonic() + timeout
        told, poked = False, 0.0
        with self.cond:
            while self.items:
                self._raise_fatal()
                if time.monotonic() - poked >= 1.0:  # someone waits now: try every second, not after the back-off
                    self._wake, poked = True, time.monotonic()
                    self.cond.notify_all()
                if self.down_since is not None and not told and on_wait is not None:
                    told = True
                    on_wait(self)
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.2))
            self._raise_fatal()
            return True

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=REQUEST_TIMEOUT_S + 1)

    def _raise_fatal(self) -> None:
        if self.fatal is not None:
            exc, self.fatal = self.fatal, None
            raise exc

    def _loop(self) -> None:
        import time

        delay = 0.5
        while True:
            with self.cond:
                while not self.items and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                batch = self.items[:BATCH_ROWS]
            try:
                self._send(batch)
            except _Unreachable as exc:
                with self.cond:
                    if self.down_since is None:
                        self.down_since = time.time()
                    self.last_error = str(exc)
                    self.cond.notify_all()
                    self._wake = False
                    end = time.monotonic() + delay
                    while not self.closed and not self._wake and time.monotonic() < end:
                        self.cond.wait(end - time.monotonic())
                delay = min(delay * 2, max(self.retry_max, 0.05))
                continue
            except Exception as exc:  # the server answered and refused the data: the run's next call raises it
                with self.cond:
                    self.fatal = exc
                    del self.items[:len(batch)]
                    self.cond.notify_all()
                continue
            with self.cond:
                del self.items[:len(batch)]
                self.down_since = None
                self.cond.notify_all()
            delay = 0.5

    def _send(self, batch: list[tuple]) -> None:
        import json

        from mlflow.entities import Metric, RunTag
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        metrics = [Metric(k, v, ts, step).to_proto() for kind, k, v, step, ts in batch if kind == "metric"]
        tags = {k: v for kind, k, v, _, _ in batch if kind == "tag"}  # the last value of a tag wins
        body = json.loads(message_to_json(LogBatch(run_id=self.run_id, metrics=metrics,
                                                   tags=[RunTag(k, v).to_proto() for k, v in tags.items()])))
        try:
            response = http_request(get_default_host_creds(self.uri), "/api/2.0/mlflow/runs/log-batch", "POST",
                                    max_retries=0, timeout=REQUEST_TIMEOUT_S, raise_on_status=False, json=body)
        except Exception as exc:  # connection refused, timeout, DNS: the server is away
            raise _Unreachable(_reason(str(exc))) from exc
        if response.status_code in (429,) or response.status_code >= 500:  # busy or restarting
            raise _Unreachable(f"HTTP {response.status_code}")
        verify_rest_response(response, "/api/2.0/mlflow/runs/log-batch")


class _Unreachable(Exception):
    pass


def _reason(text: str) -> str:
    """The cause inside a requests/urllib3 error message ("[Errno 111] Connection refused", "Read timed
    out"), not its several lines of wrapping."""
    import re

    found = re.search(r"\[Errno -?\d+\][^'\")\]]*|Read timed out|Connection aborted|Name or service not known", text)
    return found.group(0).strip() if found else text.splitlines()[0][:120] if text else "no answer"


_BUFFER: Optional[MetricBuffer] = None


def _start_buffer(run_id: str) -> None:
    """A buffer for the run when it logs to a tracking server (a local store has no outages to ride out)."""
    import mlflow

    global _BUFFER
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        _BUFFER = MetricBuffer(uri, run_id)


def _run_buffer() -> Optional[MetricBuffer]:
    import mlflow

    active = mlflow.active_run()
    if _BUFFER is not None and active is not None and active.info.run_id == _BUFFER.run_id:
        return _BUFFER
    return None


def await_server(note=None) -> bool:
    """The end of a run: wait (at most HPML_SERVER_WAIT_S) until every buffered metric and tag reached the
    server. True when it did (or there is no server), False when the server is still away."""
    buffer = _run_buffer()
    if buffer is None:
        return True
    return buffer.drain(env_seconds(SERVER_WAIT_ENV, SERVER_WAIT_DEFAULT), on_wait=note)


def buffered() -> tuple[list[tuple], Optional[float], str]:
    """What the run's buffer still holds, when the server went away (time.time()) and its last error."""
    buffer = _run_buffer()
    if buffer is None:
        return [], None, ""
    return buffer.pending(), buffer.down_since, buffer.last_error


def server_reachable(uri: str = "") -> bool:
    """False only for a tracking server that does not answer /health (a local store is always there)."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        check_health(uri, timeout=5)
        return True
    except HpmlError:
        return False


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow's client without its retries (minutes against a dead server), for calls that may fail."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({names[0]: "0", names[1]: "5"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def reopen_run(run_id: str) -> Iterator[str]:
    """Continue an existing run in this process (RUNNING again): FINISHED when the body returns, FAILED if
    it raises (`hpml log-export`: a run whose export could not be logged says so; the export stays)."""
    import mlflow

    mlflow.start_run(run_id=run_id)
    try:
        yield run_id
    except BaseException:
        _leave_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_rows(run_id: str, rows: list[tuple]) -> None:
    """Log buffered (kind, key, value, step, timestamp ms) rows as they were: metrics at their steps and
    times, tags with their last value."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    metrics = [Metric(k, float(v), int(ts), int(step)) for kind, k, v, step, ts in rows if kind == "metric"]
    tags = {k: str(v) for kind, k, v, _, _ in rows if kind == "tag"}
    client = MlflowClient()
    for i in range(0, max(len(metrics), 1), BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + BATCH], tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [])


def _close_buffer() -> Optional[MetricBuffer]:
    global _BUFFER
    buffer, _BUFFER = _BUFFER, None
    if buffer is not None:
        buffer.close()
    return buffer


def _end_run(status: str) -> None:
    """End the active run. Buffered data goes first: all of it for FINISHED (the caller waited already), a
    few seconds' worth otherwise (a signal must not wait for a lost server). A server still away gets one
    quick try: the run then stays as it was on the server rather than the process hanging for minutes."""
    import mlflow

    buffer = _run_buffer()
    down = False
    if buffer is not None:
        try:
            down = not buffer.drain(5.0 if status != "FINISHED" else env_seconds(SERVER_WAIT_ENV, SERVER_WAIT_DEFAULT))
        except Exception:
            down = status != "FINISHED"
            if not down:
                raise
        finally:
            _close_buffer()
    if down:
        _leave_run(status)
        return
    mlflow.end_run(status)


def _leave_run(status: str = "FAILED") -> None:
    """Leave the active run in this process without waiting for a lost server (one quick try to set
    `status`; end_run takes the run off MLflow's stack before it calls the server)."""
    import mlflow

    _close_buffer()
    with _fail_fast(), contextlib.suppress(Exception):
        mlflow.end_run(status)


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
    import hpml.signals as signals  # a leaf: defers a Ctrl-C around registration

    client = MlflowClient()
    # Every tag goes in with the version and the alias is decided before it exists, so the store never
    # holds a READY version without its metric tags (a kill between calls used to leave one).
    version_tags = {**tags, "run_id": mlflow.active_run().info.run_id,
                    **{k: repr(float(v)) for k, v in metrics.items() if k in (headline, M_EXACT, M_ACCURACY, M_F1)}}
    # A model with no versions yet has no champion; asking for the alias of a model that does not exist is a
    # 403 on a basic-auth server (no permission record), so the search answers that case.
    exists = bool(client.search_model_versions(f"name='{name}'", max_results=1))
    became = champion_rule(current_champion(client, name) if exists else None, metrics[headline], tags, headline)
    version = None
    try:
        with signals.deferred():  # a signal waits for the version's number, then the except below deletes it
            mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
            version = int(mv.version)
            if became:
                client.set_registered_model_alias(name, CHAMPION, str(version))
            # Concurrent registrations (a team server) read the alias before each other's versions existed:
            # settle it as if the versions had registered one after another.
            became = settle_champion(client, name, headline) == version
        return version, became
    except BaseException:
        if version is not None:
            client.delete_model_version(name, str(version))
        raise


def settle_champion(client, name: str, headline: str, rounds: int = 5) -> Optional[int]:
    """Point `champion` at the version champion_rule picks when every version is considered in registration
    order, and re-read until the alias stays put. Each registering process calls it after setting the alias,
    so the last one to finish sees every version and every other writer's alias: the result is the same as
    registering one at a time. Returns the champion's version number."""
    best = None
    for _ in range(rounds):
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))
        champ = None
        for mv in versions:
            value = mv.tags.get(headline)
            if value is not None and champion_rule(champ, float(value), mv.tags, headline):
                champ = mv
        current = current_champion(client, name)
        if champ is None or (current is not None and current.version == champ.version):
            return None if champ is None else int(champ.version)
        client.set_registered_model_alias(name, CHAMPION, str(champ.version))
        best = int(champ.version)
    return best


def current_champion(client, name: str):
    """The champion version, or None when the alias does not exist yet. Any other registry error propagates:
    reading it as "no champion" would hand the alias to a worse version."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        msg = exc.message.lower()
        # no alias yet, or no registered model yet (the decision is made before the first version exists)
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST") and "not found" in msg and \
                ("alias" in msg or "registered model" in msg):
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


# ---- runs left behind: stale RUNNING runs and interrupted runs to resume -----------------------------------
def _info(run) -> dict:
    return {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time,
            "tags": dict(run.data.tags), "params": dict(run.data.params), "name": run.info.run_name}


def run_info(run_id: str) -> dict:
    """status, tags, params of one run; an unknown ID is one line."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return _info(MlflowClient().get_run(run_id))
    except MlflowException:
        raise UsageError(f"run {run_id!r} not found at {tracking_uri()}: pass a run ID of this store or 'latest'") from None


def is_alive(tags: dict[str, str]) -> bool:
    """True when the run's process still exists, or when it ran on another host (which cannot be checked)."""
    import socket

    host, pid = tags.get(TAG_HOST), tags.get(TAG_PID)
    if not pid or host != socket.gethostname():
        return host is not None and host != socket.gethostname()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _hpml_runs(status_filter: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return []
    return list(client.search_runs(exps, filter_string=status_filter, order_by=["attributes.start_time DESC"],
                                   max_results=1000))


def stale_runs() -> list[dict]:
    """RUNNING hpml runs whose process is gone (kill -9, a crash, a reboot): newest first."""
    return [_info(r) for r in _hpml_runs("attributes.status = 'RUNNING'")
            if TAG_PID in r.data.tags and not is_alive(r.data.tags)]


def interrupted_runs(task: Optional[str] = None) -> list[dict]:
    """KILLED or FAILED runs of `task`, and stale RUNNING ones, newest first: what `resume latest` picks from."""
    ended = _hpml_runs("attributes.status = 'KILLED'") + _hpml_runs("attributes.status = 'FAILED'")
    rows = [_info(r) for r in ended
            if r.data.tags.get(TAG_TASK) in ((task,) if task else ("squad", "sst2"))]
    rows += [r for r in stale_runs() if r["tags"].get(TAG_TASK) in ((task,) if task else ("squad", "sst2"))]
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def mark_killed(run_id: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, "KILLED")


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
