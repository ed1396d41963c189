"""Data-parallel training: torchrun's elastic agent starts the workers, HF Trainer runs DDP, rank 0 alone tracks.

`hpml train-squad --nproc 2 …` (or `mlflow run … -P nproc=2`) re-runs the same command in N worker processes
through `torch.distributed.launcher.elastic_launch` (the engine behind `torchrun --standalone`). Each worker
sees RANK / LOCAL_RANK / WORLD_SIZE; HF Trainer (through accelerate) sets up the process group (NCCL on GPUs,
gloo on CPUs) and wraps the model in DistributedDataParallel. Only rank 0 opens the MLflow run (the one
`mlflow run` created, when there is one), logs, exports and registers; the other ranks never touch MLflow.

The launcher owns the outcome: when any worker fails, the elastic agent stops the others, and the launcher
ends the run FAILED with that rank's error as one line (tag `error`), deletes any registry version the run
made, and exits non-zero.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional

from hpml.errors import HpmlError, UsageError

ENV_LAUNCH_DIR = "HPML_LAUNCH_DIR"  # a folder the launcher and its workers share (run ID, errors, barrier)
RUN_ID_FILE = "run_id"
PREPARED_FILE = "prepared"


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    launch_dir: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def context() -> Dist:
    """This process's place in a data-parallel job (rank 0 of 1 when not launched)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), world, env.get(ENV_LAUNCH_DIR, ""))


def in_worker() -> bool:
    return context().distributed


# ---- checks before any worker (or run) exists -----------------------------------------------------------
def check(variant, nproc: int, batch_size: int, eval_batch_size: int) -> None:
    """Refuse what cannot run data-parallel, in one line, before anything starts."""
    import torch

    if nproc < 1:
        raise UsageError(f"nproc must be >= 1 (processes for data-parallel training), got {nproc}")
    if nproc == 1:
        return
    if variant.precision.quantization:
        raise UsageError(f"variant {variant.id} loads its 4-bit base onto one GPU (bitsandbytes device_map); "
                         "it cannot train data-parallel: run it with nproc=1")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UsageError(f"nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                         "use at most one process per GPU")
    if batch_size % nproc:
        raise UsageError(f"batch_size={batch_size} is the global batch and must divide evenly over nproc={nproc} "
                         f"processes: pick a multiple of {nproc}")
    if eval_batch_size < nproc:
        raise UsageError(f"eval_batch_size={eval_batch_size} is the global eval batch: it needs at least one "
                         f"feature per process (>= nproc={nproc})")


# ---- worker side ---------------------------------------------------------------------------------------------
def quiet_other_ranks() -> None:
    """Ranks other than 0 write their output to a log in the launch folder: one console stream, rank 0's."""
    d = context()
    if not d.distributed or d.is_main or not d.launch_dir:
        return
    log = open(os.path.join(d.launch_dir, f"rank{d.rank}.log"), "ab", buffering=0)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


def record_error(message: str) -> None:
    """A worker's failure as one line, for the launcher to report (first failure wins)."""
    d = context()
    if d.distributed and d.launch_dir:
        path = os.path.join(d.launch_dir, f"error-rank{d.rank}")
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write(message.strip().splitlines()[0] if message.strip() else "failed")


# What a collective raises in a surviving worker when another worker's process is gone (gloo on CPUs, NCCL).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited")


def peer_lost(exc: BaseException) -> bool:
    """Whether this worker failed only because another one died: the launcher names the one that died, so
    this worker's traceback would be noise on the console."""
    return context().distributed and isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_LOST)


def record_run_id(run_id: str) -> None:
    d = context()
    if d.distributed and d.is_main and d.launch_dir:
        with open(os.path.join(d.launch_dir, RUN_ID_FILE), "w") as f:
            f.write(run_id)


@contextlib.contextmanager
def main_first(timeout_s: float = 3600.0) -> Iterator[None]:
    """Rank 0 runs the block first (it writes the tokenized-feature caches); the others wait for it, then run
    the block themselves and load what it cached. A file barrier: the process group does not exist yet."""
    d = context()
    marker = os.path.join(d.launch_dir, PREPARED_FILE) if d.launch_dir else ""
    if not d.distributed or not marker:
        yield
        return
    if d.is_main:
        yield
        open(marker, "w").close()
        return
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            raise HpmlError(f"rank {d.rank}: rank 0 did not finish preparing the data in {timeout_s:.0f} s")
        time.sleep(0.2)  # rank 0 failing ends this process too: the elastic agent stops every worker
    yield


def max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per-GPU peaks as the maximum over ranks (a collective: every rank must call it)."""
    import torch
    import torch.distributed as tdist

    if not values or not (tdist.is_available() and tdist.is_initialized()):
        return values
    keys = sorted(values)
    device = "cuda" if torch.cuda.is_available() and tdist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


# ---- launcher side ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_failure(launch_dir: str, exc) -> str:
    """The root cause: the agent's earliest failing worker, told by that rank's own one-line error when it
    wrote one, else by its exit code or signal. (Ranks the agent stopped afterwards are not failures.)"""
    written = {}
    for name in os.listdir(launch_dir):
        if name.startswith("error-rank"):
            written[int(name[len("error-rank"):])] = _read(os.path.join(launch_dir, name)) or "failed"
    failures = getattr(exc, "failures", None) or {}
    if failures:
        rank, failure = min(failures.items(), key=lambda kv: kv[1].timestamp)
        if rank in written:
            return f"rank {rank}: {written[rank]}"
        code = failure.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"rank {rank}: killed by {signal.Signals(-code).name}"
        return f"rank {rank}: exited with code {code}"
    if written:
        rank = min(written)
        return f"rank {rank}: {written[rank]}"
    return f"a worker failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def launch(argv: list[str], nproc: int) -> None:
    """Run `hpml <argv>` in `nproc` data-parallel workers and wait. Raises HpmlError (one line) on failure."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from hpml import tracking

    import logging

    # The agent logs each worker failure with its own multi-line report; the launcher says it in one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    launch_dir = tempfile.mkdtemp(prefix="hpml-launch-")
    os.environ[ENV_LAUNCH_DIR] = launch_dir
    # One compute thread per worker share of the cores (torchrun's CLI sets OMP_NUM_THREADS=1 itself).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "hpml.cli", *argv)
    except BaseException as exc:  # ChildFailedError, or Ctrl-C / SIGTERM reaching the launcher
        interrupted = isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "SignalException"
        message = "interrupted" if interrupted else _first_failure(launch_dir, exc)
        run_id = _read(os.path.join(launch_dir, RUN_ID_FILE)) or os.environ.get("MLFLOW_RUN_ID", "")
        if run_id:
            tracking.fail_run(run_id, message, status="KILLED" if interrupted else "FAILED")
        raise HpmlError(f"data-parallel training failed: {message}"
                        + (f" (run {run_id} ended {'KILLED' if interrupted else 'FAILED'}, nothing registered)"
                           if run_id else "")) from None
    finally:
        os.environ.pop(ENV_LAUNCH_DIR, None)
        import shutil

        shutil.rmtree(launch_dir, ignore_errors=True)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
