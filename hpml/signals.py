"""Clean ends on SIGINT/SIGTERM: stop at a step boundary with a checkpoint, end the run KILLED, register nothing.

Outside the training loop (loading, tokenization, evaluation) the first signal interrupts at once. Inside
it, the first signal only asks the Trainer to stop after the current step and save a checkpoint (a step
takes well under a second to a few seconds); the second signal interrupts at once, whatever is running.
Either way `Interrupted` unwinds through `tracking.run`, which ends the run KILLED.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """Raised for SIGINT/SIGTERM. A KeyboardInterrupt, so libraries that catch Exception let it through."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _State:
    deferring = False  # True inside the training loop: the first signal asks for a stop, no exception
    requested: int = 0  # the first signal received while deferring (0 = none)


STATE = _State()


def _handler(signum, frame):
    if STATE.deferring and not STATE.requested:
        STATE.requested = signum
        print(f"hpml: {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Install the handlers for the duration of a command (main thread only; elsewhere a no-op)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    STATE.deferring, STATE.requested = False, 0
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        STATE.deferring, STATE.requested = False, 0


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: a first signal is only recorded (see `requested()`); leaving, a recorded one is raised."""
    before = STATE.deferring
    STATE.deferring = True
    try:
        yield
    finally:
        STATE.deferring = before
    raise_if_requested()


def requested() -> bool:
    return bool(STATE.requested)


def raise_if_requested() -> None:
    if STATE.requested and not STATE.deferring:
        raise Interrupted(STATE.requested)


def stop_callback():
    """A Trainer callback: after a first signal, save a checkpoint at this step and stop training (no
    evaluation first: the run ends KILLED whatever it would show)."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if requested():
                control.should_save = True
                control.should_training_stop = True
                control.should_evaluate = False
            return control

    return StopOnSignal()


def die_with_parent() -> None:
    """Under `mlflow run` (Linux): get SIGTERM when the parent `mlflow run` process dies, whatever killed
    it. MLflow does not forward SIGTERM to the entry point, which then trained on and registered a model."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
